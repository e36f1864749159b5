"""Physical KV-cache blocks of one model: a free list and per-block reference counts.

Data flow: KVCacheManager asks the pool for block ids (`allocate`), shares them (`incref`, or `take` for
a free block whose content the prefix cache finds again) and hands them back (`free`). A block whose
reference count drops to 0 goes to the back of the free list, so recently freed blocks are reused last
(with prefix caching, the least recently used content is evicted first). The pool knows nothing about
sequences or tensors; the backend owns the storage that block id `b` indexes (slots `b * block_size ...
(b + 1) * block_size - 1`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than the pool has free."""


class BlockPool:
    """Block ids 0..num_blocks-1, each free (ref count 0) or held by one or more owners."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._next_unused = 0  # blocks [_next_unused, num_blocks) were never handed out: they come first
        self._freed: OrderedDict[int, None] = OrderedDict()  # handed out and freed since, least recently freed first
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return self.num_blocks - self._next_unused + len(self._freed)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks from the front of the free list, each with ref count 1.

        All or nothing: raises OutOfBlocksError (taking no block) if fewer are free.
        """
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if num_blocks > self.num_free:
            raise OutOfBlocksError(
                f"requested {num_blocks} blocks but only {self.num_free} of "
                f"{self.num_blocks} are free"
            )
        num_unused = min(num_blocks, self.num_blocks - self._next_unused)
        block_ids = list(range(self._next_unused, self._next_unused + num_unused))
        self._next_unused += num_unused
        block_ids += [self._freed.popitem(last=False)[0] for _ in range(num_blocks - num_unused)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add an owner to each block (e.g. a forked sequence sharing a prefix)."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_in_use(block_id, "incref")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def take(self, block_ids: Iterable[int]) -> None:
        """Add an owner to each block, free or not: a free block leaves the free list (the prefix cache found
        its content again)."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_id(block_id)
            if block_id >= self._next_unused:
                raise ValueError(f"cannot take block {block_id}: it was never handed out")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._freed[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each block; a block with no owner left returns to the free list.

        Checks every id before changing anything, so a bad id leaves the pool as it was.
        """
        block_ids = list(block_ids)
        for block_id, num_drops in Counter(block_ids).items():
            self._check_in_use(block_id, "free")
            if num_drops > self._ref_counts[block_id]:
                raise ValueError(
                    f"cannot free block {block_id} {num_drops} times: "
                    f"it has only {self._ref_counts[block_id]} owner(s)"
                )
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._freed[block_id] = None

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")

    def _check_in_use(self, block_id: int, verb: str) -> None:
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot {verb} block {block_id}: it is already free")
