"""Maps sequences to block tables over one model's BlockPool; counts only, no tensors.

Data flow: the scheduler asks `can_allocate(seq, n)` before a model's cache catches up to `n` tokens
and then calls `allocate(seq, n)`; the backend reads `block_table(seq)` to know
where token `pos` of the sequence lives in its cache storage. A speculative rollback or a preemption
calls `truncate(seq, n)`; a finished sequence calls `free(seq)`. Tables only grow in `allocate` and
only shrink in `truncate` / `free`, so after every request ends every block is back in the pool.
"""

from __future__ import annotations

from collab_decode.kvcache.block_pool import BlockPool, OutOfBlocksError


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables of the sequences that hold cache in one model's pool."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}

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
        self._tables.setdefault(seq_id, []).extend(new_ids)

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
        # Free from the tail so the last-written blocks go back first.
        self.pool.free(reversed(table[num_keep:]))
        del table[num_keep:]

    def free(self, seq_id: int) -> None:
        """Return all of `seq_id`'s blocks to the pool and forget it (no-op if unknown)."""
        table = self._tables.pop(seq_id, None)
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
