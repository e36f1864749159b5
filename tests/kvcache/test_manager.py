"""KVCacheManager: block tables per sequence, slot mapping, truncation, leak checks, budget math."""

import random

import pytest

from collab_decode.kvcache import KVCacheManager, OutOfBlocksError, num_blocks_for_budget


def assert_invariants(manager: KVCacheManager) -> None:
    tables = [manager.block_table(seq_id) for seq_id in manager.seq_ids()]
    all_ids = [block_id for table in tables for block_id in table]
    assert len(all_ids) == manager.num_used_blocks
    assert len(set(all_ids)) == len(all_ids), "a block is in two tables"
    assert manager.num_used_blocks + manager.num_free_blocks == manager.pool.num_blocks


def test_num_blocks_needed_rounds_up():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    assert [manager.num_blocks_needed(0, n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    manager.allocate(0, 5)
    assert manager.num_blocks_needed(0, 3) == 0
    assert manager.num_blocks_needed(0, 8) == 0
    assert manager.num_blocks_needed(0, 9) == 1


def test_allocate_grows_and_never_shrinks():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.allocate(7, 5)
    assert manager.block_table(7) == [0, 1]
    assert manager.num_tokens_capacity(7) == 8
    manager.allocate(7, 2)
    assert manager.block_table(7) == [0, 1]
    manager.allocate(7, 9)
    assert manager.block_table(7) == [0, 1, 2]
    assert manager.num_used_blocks == 3


def test_block_table_is_a_copy():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    manager.allocate(0, 3)
    manager.block_table(0).append(99)
    assert manager.block_table(0) == [0, 1]


def test_out_of_blocks_leaves_state_unchanged():
    manager = KVCacheManager(num_blocks=3, block_size=2)
    manager.allocate(0, 3)
    assert not manager.can_allocate(1, 4) and manager.can_allocate(1, 2)
    with pytest.raises(OutOfBlocksError, match="sequence 1"):
        manager.allocate(1, 4)
    assert not manager.has(1)
    assert manager.block_table(0) == [0, 1] and manager.num_free_blocks == 1
    with pytest.raises(OutOfBlocksError):
        manager.allocate(0, 7)
    assert manager.block_table(0) == [0, 1]


def test_truncate_frees_surplus_and_keeps_sequence():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.allocate(0, 12)
    manager.truncate(0, 5)
    assert manager.block_table(0) == [0, 1]
    manager.truncate(0, 8)  # already exactly 2 blocks
    assert manager.block_table(0) == [0, 1]
    manager.truncate(0, 0)
    assert manager.has(0) and manager.block_table(0) == []
    assert manager.num_used_blocks == 0
    manager.allocate(0, 1)
    assert manager.num_used_blocks == 1


def test_truncate_does_not_grow():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.allocate(0, 4)
    with pytest.raises(ValueError, match="sequence 0"):
        manager.truncate(0, 5)
    assert manager.block_table(0) == [0]


def test_free_forgets_sequence_and_unknown_is_noop():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    manager.allocate(3, 5)
    manager.free(3)
    assert not manager.has(3) and manager.seq_ids() == []
    manager.free(3)
    manager.free(42)
    manager.check_empty()


def test_unknown_sequence_queries_raise_key_error():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    for query in (manager.block_table, manager.num_tokens_capacity):
        with pytest.raises(KeyError, match="5"):
            query(5)
    with pytest.raises(KeyError):
        manager.truncate(5, 0)




def test_check_empty_lists_leaks():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    manager.allocate(9, 3)
    with pytest.raises(AssertionError, match="9"):
        manager.check_empty()
    manager.truncate(9, 0)
    manager.check_empty()


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_keep_invariants(seed):
    rng = random.Random(seed)
    manager = KVCacheManager(num_blocks=16, block_size=4)
    num_tokens = {}  # seq_id -> tokens we asked the table to hold
    for _ in range(300):
        seq_id = rng.randrange(6)
        op = rng.choice(["allocate", "allocate", "truncate", "free"])
        if op == "allocate":
            target = num_tokens.get(seq_id, 0) + rng.randint(0, 9)
            if manager.can_allocate(seq_id, target):
                manager.allocate(seq_id, target)
                num_tokens[seq_id] = target
            else:
                before = {s: manager.block_table(s) for s in manager.seq_ids()}
                with pytest.raises(OutOfBlocksError):
                    manager.allocate(seq_id, target)
                assert {s: manager.block_table(s) for s in manager.seq_ids()} == before
        elif op == "truncate" and seq_id in num_tokens:
            num_tokens[seq_id] = rng.randint(0, num_tokens[seq_id])
            manager.truncate(seq_id, num_tokens[seq_id])
            assert len(manager.block_table(seq_id)) == -(-num_tokens[seq_id] // 4)
        elif op == "free":
            manager.free(seq_id)
            num_tokens.pop(seq_id, None)
        for s, n in num_tokens.items():
            assert manager.num_tokens_capacity(s) >= n
        assert_invariants(manager)
    for seq_id in list(manager.seq_ids()):
        manager.free(seq_id)
    manager.check_empty()
    assert manager.num_free_blocks == 16


def test_budget_counts_k_and_v_over_all_layers():
    # 2 (K, V) * 2 layers * 16 tokens * 4 heads * 8 dims * 2 bytes = 4096 bytes per block.
    sizes = dict(num_layers=2, num_kv_heads=4, head_dim=8, dtype_bytes=2, block_size=16)
    assert num_blocks_for_budget(4096, **sizes) == 1
    assert num_blocks_for_budget(10 * 4096 + 4095, **sizes) == 10


def test_budget_too_small_quotes_values():
    with pytest.raises(ValueError, match="memory_bytes=4095"):
        num_blocks_for_budget(4095, num_layers=2, num_kv_heads=4, head_dim=8, dtype_bytes=2,
                              block_size=16)


def test_budget_rejects_bad_sizes():
    with pytest.raises(ValueError, match="head_dim"):
        num_blocks_for_budget(1 << 30, num_layers=2, num_kv_heads=4, head_dim=0, dtype_bytes=2,
                              block_size=16)


def test_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0)
