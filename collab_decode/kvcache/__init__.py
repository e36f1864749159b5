"""Paged KV-cache bookkeeping: which physical blocks each sequence owns (no tensors here)."""

from collab_decode.kvcache.block_pool import BlockPool, OutOfBlocksError
from collab_decode.kvcache.manager import KVCacheManager, num_blocks_for_budget

__all__ = ["BlockPool", "KVCacheManager", "OutOfBlocksError", "num_blocks_for_budget"]
