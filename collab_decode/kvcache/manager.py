"""Maps sequences to block tables over one model's BlockPool; counts only, no tensors.

Data flow: the scheduler asks `can_allocate(seq, n)` before a model's cache catches up to `n` tokens
and then calls `allocate(seq, n)`; the backend reads `block_table(seq)` to know
where token `pos` of the sequence lives in its cache storage. A speculative rollback or a preemption
calls `truncate(seq, n)`; a finished sequence calls `free(seq)`. Tables only grow in `allocate` (and
`match`) and only shrink in `truncate` / `free`, so after every request ends every block is back in the pool.

Prefix caching (`prefix_caching=True`): a full block whose K/V a forward has written enters the cache
(`register`), keyed by its tokens and by the block before it, so a key names the whole prefix up to the
block's end. A sequence admitted with no table first takes the longest run of cached blocks that its
tokens begin with (`match`): those tokens' K/V are not computed again. A cached block stays cached after
its owners free it, on the pool's free list, until `allocate` hands it out for other content (least
recently freed first); every reuse of a block changes its generation, which the keys of the blocks after
it name, so a key can never lead to content that has been overwritten.
"""

from __future__ import annotations

from collab_decode.kvcache.block_pool import BlockPool, OutOfBlocksError

ROOT = (-1, 0)  # the "block before" the first block of every sequence: (block id, generation)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables of the sequences that hold cache in one model's pool."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}
        self.prefix_caching = prefix_caching
        # (block before's id, its generation, the block's tokens) -> the block holding their K/V
        self._cache: dict[tuple, int] = {}
        self._key: dict[int, tuple] = {}  # block -> its key in _cache (cached blocks only)
        self._generation = [0] * num_blocks if prefix_caching else []  # times each block took new content
        # seq -> (leading blocks of its table that are in the cache, matched or registered; the (block, generation)
        # that the key of its next block names: its last such block, or the cached twin of it)
        self._known: dict[int, tuple[int, tuple[int, int]]] = {}
        self.num_queried_tokens = 0  # tokens of sequences that looked for a cached prefix (`match`)
        self.num_hit_tokens = 0  # of them, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def num_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """How many more blocks `seq_id` needs for its table to hold `num_tokens` tokens in total."""
        self._check_num_tokens(num_tokens)
        num_held = len(self._tables.get(seq_id, ()))
        return max(0, _ceil_div(num_tokens, self.block_size) - num_held)

    def holds(self, seq_id: int, num_tokens: int) -> bool:
        """`seq_id`'s table already holds room for `num_tokens` tokens (allocate would add nothing)."""
        table = self._tables.get(seq_id)
        return table is not None and num_tokens <= len(table) * self.block_size

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_blocks_needed(seq_id, num_tokens))

    def can_admit(self, seq_id: int, token_ids: list[int], num_tokens: int) -> bool:
        """can_allocate for a sequence that will first `match` token_ids: the cached blocks it finds need no new
        block (but those on the free list leave it)."""
        if not self.prefix_caching or self._tables.get(seq_id):
            return self.can_allocate(seq_id, num_tokens)
        found = self.cached_blocks(token_ids, len(token_ids) - 1)
        num_new = max(0, _ceil_div(num_tokens, self.block_size) - len(found))
        return num_new + sum(1 for b in found if self.pool.ref_count(b) == 0) <= self.pool.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Grow `seq_id`'s table to hold `num_tokens` tokens (never shrinks it).

        Raises OutOfBlocksError, allocating nothing, if the pool cannot supply the blocks.
        """
        self._check_num_tokens(num_tokens)
        if self.holds(seq_id, num_tokens):
            return  # the usual decode step: the last block still has room
        num_needed = self.num_blocks_needed(seq_id, num_tokens)
        try:
            new_ids = self.pool.allocate(num_needed)
        except OutOfBlocksError as e:
            raise OutOfBlocksError(
                f"sequence {seq_id} needs {num_needed} more blocks for {num_tokens} tokens: {e}"
            ) from None
        if self.prefix_caching:
            for block in new_ids:  # new content: what the block held before leaves the cache
                self._drop(block)
        self._tables.setdefault(seq_id, []).extend(new_ids)

    def match(self, seq_id: int, token_ids: list[int], max_tokens: int) -> int:
        """Give a sequence that holds no block the cached blocks its first `max_tokens` tokens begin with
        (whole blocks, the longest run); returns how many tokens they hold (0 without prefix caching)."""
        if not self.prefix_caching or self._tables.get(seq_id):
            return 0
        blocks, size = self.cached_blocks(token_ids, max_tokens), self.block_size
        if blocks:
            self.pool.take(blocks)
            self._tables[seq_id] = blocks
            self._known[seq_id] = (len(blocks), (blocks[-1], self._generation[blocks[-1]]))
        self.num_queried_tokens += len(token_ids)
        self.num_hit_tokens += len(blocks) * size
        return len(blocks) * size

    def cached_blocks(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """The longest run of cached blocks that the first `max_tokens` of token_ids begin with (taking none)."""
        size, blocks, before = self.block_size, [], ROOT
        for start in range(0, max_tokens - size + 1, size):
            block = self._cache.get((*before, tuple(token_ids[start:start + size])))
            if block is None:
                break
            blocks.append(block)
            before = (block, self._generation[block])
        return blocks

    def register(self, seq_id: int, token_ids: list[int], num_tokens: int) -> None:
        """The K/V of `seq_id`'s first num_tokens tokens (token_ids) is written and final: its whole blocks
        enter the prefix cache (a block whose key another block already has stays out: the first keeps it)."""
        if not self.prefix_caching:
            return
        table, size = self._tables.get(seq_id), self.block_size
        known, before = self._known.get(seq_id, (0, ROOT))
        full = min(num_tokens // size, len(table)) if table else 0
        if full <= known:
            return
        for i in range(known, full):
            block = table[i]
            key = (*before, tuple(token_ids[i * size:(i + 1) * size]))
            twin = self._cache.get(key)
            if twin is None and block not in self._key:
                self._cache[key], self._key[block] = block, key
                twin = block
            # the blocks after it are keyed after the cached block with its content (its twin, when another
            # sequence computed the same tokens first), so a later sequence walking the cache reaches them
            before = (twin, self._generation[twin]) if twin is not None else (block, self._generation[block])
        self._known[seq_id] = (full, before)

    def frees_blocks(self, seq_id: int) -> bool:
        """Whether freeing `seq_id` would give a block back to the pool (one that no other sequence holds)."""
        table = self._tables.get(seq_id, ())
        if not self.prefix_caching:
            return bool(table)  # (no block is shared)
        return any(self.pool.ref_count(b) == 1 for b in table)

    def forget_content(self, seq_id: int) -> list[int]:
        """The blocks only `seq_id` holds, taken out of the prefix cache: their K/V is about to be cleared
        (a failed sequence's). Blocks it shares keep their content."""
        table = self._tables.get(seq_id, [])
        mine = [b for b in table if self.pool.ref_count(b) == 1]
        for block in mine:
            self._drop(block)
        return mine

    def _drop(self, block: int) -> None:
        """Take a block out of the prefix cache: its content is about to change."""
        if not self.prefix_caching:
            return
        self._generation[block] += 1
        key = self._key.pop(block, None)
        if key is not None:
            del self._cache[key]

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Shrink `seq_id`'s table to exactly the blocks that hold its first `num_tokens` tokens.

        Used for speculative rollback and preemption; the sequence stays known even at 0 tokens.
        Never grows the table: asking for more tokens than it holds raises ValueError.
        """
        self._check_num_tokens(num_tokens)
        table = self._table(seq_id)
        num_keep = _ceil_div(num_tokens, self.block_size)
        if num_keep > len(table):
            raise ValueError(
                f"cannot truncate sequence {seq_id} to {num_tokens} tokens: its table holds "
                f"only {len(table) * self.block_size} ({len(table)} blocks)"
            )
        known = self._known.get(seq_id, (0, ROOT))[0]
        if num_tokens < known * self.block_size:  # the prefix cache's blocks are never written again
            raise ValueError(f"cannot truncate sequence {seq_id} to {num_tokens} tokens: its first "
                             f"{known * self.block_size} are in the prefix cache")
        # Free from the tail so the last-written blocks go back first.
        self.pool.free(reversed(table[num_keep:]))
        del table[num_keep:]

    def free(self, seq_id: int) -> None:
        """Return all of `seq_id`'s blocks to the pool and forget it (no-op if unknown)."""
        table = self._tables.pop(seq_id, None)
        self._known.pop(seq_id, None)
        if table:
            self.pool.free(reversed(table))

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of `seq_id`'s block table (physical block ids in token order)."""
        return list(self._table(seq_id))

    def num_tokens_capacity(self, seq_id: int) -> int:
        return len(self._table(seq_id)) * self.block_size

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[int]:
        return list(self._tables)

    def check_empty(self) -> None:
        """Raise AssertionError naming the leak if any block is still held."""
        if self.num_used_blocks == 0:
            return
        held = {seq_id: table for seq_id, table in self._tables.items() if table}
        raise AssertionError(
            f"{self.num_used_blocks} of {self.pool.num_blocks} blocks still used; "
            f"tables holding blocks: {held}"
        )

    def _table(self, seq_id: int) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise KeyError(f"unknown sequence {seq_id}")
        return table

    @staticmethod
    def _check_num_tokens(num_tokens: int) -> None:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")


def num_blocks_for_budget(
    memory_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    block_size: int,
) -> int:
    """How many cache blocks fit in `memory_bytes`: each holds K and V for every layer."""
    # K and V, per layer, per head, per token: (2, L, block_size, H_kv, D) elements per block.
    sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 dtype_bytes=dtype_bytes, block_size=block_size)
    bad = {name: value for name, value in sizes.items() if value <= 0}
    if bad:
        raise ValueError(f"sizes must be > 0, got {bad}")
    bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes
    num_blocks = memory_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"memory_bytes={memory_bytes} holds no KV block of {bytes_per_block} bytes "
            f"(2 * num_layers={num_layers} * block_size={block_size} * "
            f"num_kv_heads={num_kv_heads} * head_dim={head_dim} * dtype_bytes={dtype_bytes})"
        )
    return num_blocks
