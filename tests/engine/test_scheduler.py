"""The scheduler with fake sequences and no weights: admission, token budget, preemption, freeing.

Sequences here are plain bookkeeping (token ids, num_cached per model); a "step" is simulated by
advancing num_cached by the planned chunk and appending a token where the chunk reached the end.
"""

from __future__ import annotations

import itertools

import pytest

from collab_decode.engine.scheduler import Scheduler, SchedulerConfig
from collab_decode.engine.sequence import LARGE, SMALL, Sequence, Status
from collab_decode.kvcache import KVCacheManager
from collab_decode.routing import build_router, parse_routing
from collab_decode.sampling import SamplingParams

BLOCK = 4
_ids = itertools.count()


def create_scheduler(small_blocks: int = 64, large_blocks: int | None = 64, **config) -> Scheduler:
    kv = {SMALL: KVCacheManager(small_blocks, BLOCK)}
    if large_blocks is not None:
        kv[LARGE] = KVCacheManager(large_blocks, BLOCK)
    return Scheduler(SchedulerConfig(**config), kv)


def create_requests(scheduler: Scheduler, prompt_lens: list[int], policy: str = "small") -> list[Sequence]:
    seqs = []
    for n in prompt_lens:
        seq_id = next(_ids)  # also the arrival order: later requests are younger
        spec = parse_routing(policy)
        seq = Sequence(seq_id, list(range(1, n + 1)), SamplingParams(max_tokens=100), arrival=seq_id,
                       spec=spec, router=build_router(spec))
        scheduler.add(seq)
        seqs.append(seq)
    return seqs


def run_plan(plan) -> None:
    """What the engine does with a plan, minus the models: the small cache catches up by the chunk, and a
    sequence whose chunk reached its end gets one new token."""
    for seq, n in zip(plan.seqs, plan.num_new_tokens):
        seq.num_cached[SMALL] += n
        if seq.num_cached[SMALL] == seq.num_tokens:
            seq.append(7, SMALL)


def test_admits_oldest_first_up_to_max_num_seqs():
    scheduler = create_scheduler(max_num_seqs=2)
    seqs = create_requests(scheduler, [3, 3, 3])
    plan = scheduler.schedule()
    assert plan.seqs == seqs[:2] and plan.num_new_tokens == [3, 3]
    assert list(scheduler.waiting) == [seqs[2]] and seqs[2].status is Status.WAITING
    scheduler.finish(seqs[0], "stop")
    assert scheduler.schedule().seqs == [seqs[1], seqs[2]]


def test_token_budget_chunks_prefill_and_keeps_decodes_first():
    scheduler = create_scheduler(max_num_batched_tokens=5)
    first, = create_requests(scheduler, [2])
    run_plan(scheduler.schedule())  # first: prefilled, now decoding
    long, = create_requests(scheduler, [11])
    chunks = []
    while long.num_cached[SMALL] < long.num_prompt_tokens:
        plan = scheduler.schedule()
        assert plan.seqs[0] is first and plan.num_new_tokens[0] == 1  # the decode is never starved
        assert sum(plan.num_new_tokens) <= 5
        chunks.append(plan.num_new_tokens[1])
        sampled = plan.sampled()
        run_plan(plan)
    assert chunks == [4, 4, 3]
    assert sampled == [True, True]  # the last chunk reaches the prompt's end: that step proposes a token


def test_admission_checks_the_large_pool_only_for_policies_that_use_it():
    scheduler = create_scheduler(small_blocks=64, large_blocks=2)  # the large pool holds 8 tokens
    scheduler.kv[LARGE].allocate(999, 8)  # all of it taken
    routed, = create_requests(scheduler, [3], "entropy:1")
    small_only, = create_requests(scheduler, [3], "small")
    plan = scheduler.schedule()
    assert plan.seqs == [] and list(scheduler.waiting) == [routed, small_only]  # arrival order is kept
    scheduler.kv[LARGE].free(999)
    assert scheduler.schedule().seqs == [routed, small_only]


def test_a_dry_small_pool_preempts_the_youngest_and_requeues_it_first():
    scheduler = create_scheduler(small_blocks=5)  # 20 tokens
    old, young = create_requests(scheduler, [8, 8])
    run_plan(scheduler.schedule())  # both prefilled: 8 cached tokens = 2 blocks each, one block free
    later, = create_requests(scheduler, [8])  # waits: admission needs 3 free blocks
    old.token_ids += [7] * 4  # old's next chunk needs 2 more blocks
    plan = scheduler.schedule()
    assert plan.seqs == [old] and plan.preempted == [young]
    assert young.status is Status.WAITING and list(scheduler.waiting) == [young, later]
    assert young.num_cached == {SMALL: 0, LARGE: 0} and young.stats.num_preemptions == 1
    assert not scheduler.kv[SMALL].has(young.seq_id)
    assert young.output_ids == [7]  # its output is kept and recomputed


def test_the_youngest_preempts_itself_rather_than_an_older_sequence():
    scheduler = create_scheduler(small_blocks=4)
    old, young = create_requests(scheduler, [8, 3])
    run_plan(scheduler.schedule())  # old: 9 tokens (3 blocks), young: 4 tokens (1 block): pool full
    young.token_ids += [7] * 4  # young grows past its block first
    plan = scheduler.schedule()
    assert young in plan.preempted and old in plan.seqs and old.stats.num_preemptions == 0


@pytest.mark.parametrize("order", ["old first", "young first"])
def test_reserve_on_the_large_pool_preempts_the_youngest_large_holder(order):
    scheduler = create_scheduler(large_blocks=3)  # 12 tokens
    old, young = create_requests(scheduler, [4, 4], "entropy:1")
    bystander, = create_requests(scheduler, [4], "small")  # the youngest of all, but holds no large blocks
    run_plan(scheduler.schedule())  # 5 tokens each: 2 large blocks each would be 4 > 3
    routed = [old, young] if order == "old first" else [young, old]
    preempted = scheduler.reserve(LARGE, routed, [s.num_tokens for s in routed])
    assert preempted == [young] and young.status is Status.WAITING
    assert old.status is Status.RUNNING and scheduler.kv[LARGE].block_table(old.seq_id) != []
    assert bystander.status is Status.RUNNING and bystander.stats.num_preemptions == 0
    assert not scheduler.kv[SMALL].has(young.seq_id) and not scheduler.kv[LARGE].has(young.seq_id)


def test_finish_and_truncate_return_blocks():
    scheduler = create_scheduler()
    seq, = create_requests(scheduler, [10])
    run_plan(scheduler.schedule())
    scheduler.reserve(LARGE, [seq], [seq.num_tokens])
    seq.num_cached[LARGE] = seq.num_tokens
    assert scheduler.kv[LARGE].num_used_blocks == 3
    scheduler.truncate(seq, LARGE, 4)
    assert seq.num_cached[LARGE] == 4 and scheduler.kv[LARGE].num_used_blocks == 1
    scheduler.finish(seq, "stop")
    assert seq.finished and not scheduler.running
    assert scheduler.kv[SMALL].num_used_blocks == scheduler.kv[LARGE].num_used_blocks == 0


@pytest.mark.parametrize("tokens, fits", [(256, True), (257, False)])
def test_can_ever_fit_checks_every_pool(tokens, fits):
    assert create_scheduler(small_blocks=100, large_blocks=64).can_ever_fit(tokens) is fits
