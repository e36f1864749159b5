"""Prefix caching in KVCacheManager: full blocks enter the cache once written, a sequence admitted later takes the
longest run of cached blocks its tokens begin with, a cached block stays until the pool hands it out again (least
recently freed first), and a key names the whole prefix, never content that has been overwritten."""

import pytest

from collab_decode.kvcache import KVCacheManager


def cached(num_blocks: int = 8, block_size: int = 4) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, prefix_caching=True)


def written(manager: KVCacheManager, seq_id: int, tokens: list[int]) -> list[int]:
    """A sequence that computed all its tokens' K/V (allocated, registered); its table."""
    manager.allocate(seq_id, len(tokens))
    manager.register(seq_id, tokens, len(tokens))
    return manager.block_table(seq_id)


def test_a_later_sequence_takes_the_blocks_its_tokens_begin_with():
    manager = cached()
    first = written(manager, 0, list(range(10)))  # blocks of 0-3, 4-7 full; 8-9 partial (not cached)
    manager.free(0)
    tokens = list(range(8)) + [50, 51, 52]
    assert manager.match(1, tokens, len(tokens) - 1) == 8
    assert manager.block_table(1) == first[:2]
    assert [manager.pool.ref_count(b) for b in first[:2]] == [1, 1]
    assert manager.num_used_blocks == 2
    manager.allocate(1, len(tokens))  # grows from the matched blocks
    assert manager.block_table(1)[:2] == first[:2] and len(manager.block_table(1)) == 3
    assert (manager.num_queried_tokens, manager.num_hit_tokens) == (11, 8)


def test_two_running_sequences_share_a_block():
    manager = cached()
    table = written(manager, 0, list(range(8)))
    tokens = list(range(4)) + [9, 9, 9]
    assert manager.match(1, tokens, len(tokens) - 1) == 4
    assert manager.block_table(1) == table[:1] and manager.pool.ref_count(table[0]) == 2
    manager.free(0)
    assert manager.pool.ref_count(table[0]) == 1  # still held by sequence 1
    manager.free(1)
    manager.check_empty()


def test_the_last_token_is_always_computed():
    manager = cached()
    written(manager, 0, list(range(8)))
    manager.free(0)
    # 8 tokens, all cached; at most 7 may come from the cache, so only the first whole block does
    assert manager.match(1, list(range(8)), 7) == 4


def test_a_key_names_the_whole_prefix():
    manager = cached()
    written(manager, 0, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    manager.free(0)
    assert manager.match(1, [9, 2, 3, 4, 5, 6, 7, 8, 0], 8) == 0  # block 2's tokens, after another first block
    assert not manager.has(1)
    assert manager.match(2, [1, 2, 3, 4, 9, 6, 7, 8, 0], 8) == 4  # the first block only


def test_without_prefix_caching_nothing_is_cached():
    manager = KVCacheManager(8, 4)
    written(manager, 0, list(range(8)))
    manager.free(0)
    assert manager.match(1, list(range(9)), 8) == 0 and manager.num_used_blocks == 0


def test_a_sequence_holding_blocks_matches_nothing():
    manager = cached()
    written(manager, 0, list(range(8)))
    manager.free(0)
    manager.allocate(1, 2)
    assert manager.match(1, list(range(9)), 8) == 0 and len(manager.block_table(1)) == 1


def test_the_least_recently_freed_content_is_evicted_first():
    manager = cached(num_blocks=4, block_size=2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    written(manager, 0, a)
    written(manager, 1, b)
    manager.free(0)
    manager.free(1)
    manager.allocate(2, 4)  # two blocks handed out again: a's, freed first
    assert manager.match(3, a + [0], 4) == 0
    assert manager.match(4, b + [0], 4) == 4
    manager.free(2)
    manager.free(3)
    manager.free(4)
    manager.check_empty()


def test_content_found_again_leaves_the_free_list():
    manager = cached(num_blocks=2, block_size=2)
    written(manager, 0, [1, 2, 3, 4])
    manager.free(0)
    assert manager.num_free_blocks == 2
    assert manager.match(1, [1, 2, 3, 4, 5], 4) == 4
    assert manager.num_free_blocks == 0 and not manager.can_allocate(2, 1)


def test_a_reused_block_leads_to_none_of_what_followed_its_old_content():
    manager = cached(num_blocks=2, block_size=2)
    first, second = written(manager, 0, [1, 2, 3, 4])
    manager.free(0)
    manager.pool.take([second])  # (another holder keeps the second block, so the first is handed out before it)
    written(manager, 1, [7, 8])
    assert manager.block_table(1) == [first]
    # the first block now holds 7, 8; the second still holds 3, 4 after 1, 2, not after 7, 8
    assert manager.match(2, [7, 8, 3, 4, 0], 4) == 2


def test_a_block_written_twice_keeps_the_first_key():
    manager = cached()
    one = written(manager, 0, list(range(4)))
    two = written(manager, 1, list(range(4)))
    manager.free(1)
    manager.free(0)
    assert manager.match(2, list(range(5)), 4) == 4 and manager.block_table(2) == one != two


def test_truncating_into_cached_blocks_is_refused():
    manager = cached()
    written(manager, 0, list(range(10)))
    manager.truncate(0, 8)  # the partial block goes
    with pytest.raises(ValueError, match="prefix cache"):
        manager.truncate(0, 7)


def test_a_failed_sequences_own_blocks_leave_the_cache():
    manager = cached()
    shared = written(manager, 0, list(range(4)))
    tokens = list(range(12))
    assert manager.match(1, tokens, 11) == 4
    manager.allocate(1, 12)
    manager.register(1, tokens, 12)
    own = manager.block_table(1)[1:]
    assert manager.forget_content(1) == own  # the shared first block keeps its content
    manager.free(1)
    assert manager.match(2, tokens, 11) == 4 and manager.block_table(2) == shared


@pytest.mark.parametrize("later", [False, True])
def test_what_follows_a_twin_block_is_found_through_the_first(later):
    """Two sequences computed the same blocks at once (the second's are twins, not cached): the blocks the second
    computes after them, in the same register call or a later one (it decoded on), are keyed after the cached
    ones, so a later sequence with the second's tokens finds them all."""
    manager = cached()
    written(manager, 0, list(range(8)))
    second = list(range(8)) + [9, 9, 9, 9, 0]
    written(manager, 1, second[:8] if later else second)
    if later:
        manager.allocate(1, 13)
        manager.register(1, second, 12)
    manager.free(0)
    manager.free(1)
    assert manager.match(2, second, 12) == 12


def test_a_sequence_frees_blocks_only_if_it_holds_one_alone():
    manager = cached()
    written(manager, 0, list(range(10)))
    assert manager.match(1, list(range(10)), 9) == 8
    assert (manager.frees_blocks(0), manager.frees_blocks(1)) == (True, False)


def test_without_prefix_caching_a_failed_sequences_blocks_are_all_its_own():
    manager = KVCacheManager(8, 4)
    manager.allocate(0, 6)
    assert manager.forget_content(0) == manager.block_table(0) and manager.frees_blocks(0)


def test_admission_counts_the_cached_blocks_a_sequence_will_find():
    manager = cached(num_blocks=4, block_size=4)
    written(manager, 0, list(range(12)))  # 3 blocks held, 1 free
    tokens = list(range(12)) + [99, 98]
    assert not manager.can_allocate(1, 15)  # 4 blocks from scratch
    assert manager.can_admit(1, tokens, 15)  # finds 3 (held: they stay off the free list), needs 1
    manager.free(0)  # now the 3 cached blocks are free too: taking them leaves 1 free for the new one
    assert manager.can_admit(1, tokens, 15) and not manager.can_admit(1, tokens, 21)
    assert KVCacheManager(4, 4).can_admit(1, tokens, 15) == KVCacheManager(4, 4).can_allocate(1, 15)
