"""BlockPool: free-list order, ref counts, all-or-nothing allocation, double-free errors."""

import pytest

from collab_decode.kvcache import BlockPool
from collab_decode.kvcache.block_pool import OutOfBlocksError


def test_new_pool_is_all_free():
    pool = BlockPool(4)
    assert (pool.num_blocks, pool.num_free, pool.num_used) == (4, 4, 0)


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_rejects_non_positive_size(num_blocks):
    with pytest.raises(ValueError, match=str(num_blocks)):
        BlockPool(num_blocks)


def test_allocate_takes_from_front_and_free_appends_to_back():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.free([0])
    # 0 went to the back: the next allocations see 2, 3, then 0.
    assert pool.allocate(3) == [2, 3, 0]
    assert (pool.num_free, pool.num_used) == (0, 4)


def test_allocate_zero_is_empty():
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    assert pool.num_free == 2


def test_out_of_blocks_allocates_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    with pytest.raises(OutOfBlocksError, match=r"requested 2 .* only 1"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.allocate(1) == [2]


def test_out_of_blocks_is_a_runtime_error():
    assert issubclass(OutOfBlocksError, RuntimeError)


def test_ref_counts_keep_shared_block_until_last_free():
    pool = BlockPool(2)
    [block_id] = pool.allocate(1)
    pool.incref([block_id])
    assert pool.ref_count(block_id) == 2
    pool.free([block_id])
    assert pool.num_used == 1 and pool.ref_count(block_id) == 1
    pool.free([block_id])
    assert pool.num_used == 0 and pool.ref_count(block_id) == 0


def test_double_free_names_the_block():
    pool = BlockPool(3)
    pool.allocate(2)
    pool.free([1])
    with pytest.raises(ValueError, match="block 1"):
        pool.free([1])


def test_bad_free_changes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    # Block 0 is fine, block 2 is free: the whole call must fail before touching block 0.
    with pytest.raises(ValueError, match="block 2"):
        pool.free([0, 2])
    assert pool.ref_count(0) == 1 and pool.num_used == 2
    with pytest.raises(ValueError, match="block 0"):
        pool.free([0, 0])
    assert pool.ref_count(0) == 1


def test_incref_of_free_block_raises():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="block 1"):
        pool.incref([1])


@pytest.mark.parametrize("block_id", [-1, 5])
def test_out_of_range_id_raises(block_id):
    pool = BlockPool(5)
    with pytest.raises(ValueError, match="out of range"):
        pool.free([block_id])


def test_negative_allocate_raises():
    with pytest.raises(ValueError):
        BlockPool(2).allocate(-1)
