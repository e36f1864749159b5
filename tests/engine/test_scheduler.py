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


def test_the_usual_decode_step_is_the_plan_the_general_rule_makes():
    """Whenever `decodes` recognises the usual step (every running sequence decoding one token in blocks it holds,
    nothing waiting), the general rule plans the same sequences, one token each, and gives no block, admits and
    preempts nobody: over a run with arrivals, finishes, chunked prefills, block boundaries and preemption."""
    scheduler = create_scheduler(small_blocks=9, max_num_seqs=3, max_num_batched_tokens=6)
    seqs = create_requests(scheduler, [3, 5])
    fast_steps = 0
    for step in range(80):
        if step % 9 == 0:
            seqs += create_requests(scheduler, [2 + step % 7])
        for seq in list(scheduler.running):
            if seq.num_output_tokens >= 12:  # its max_tokens
                scheduler.finish(seq, "length")
        decoding = scheduler.decodes()
        if decoding is not None:
            fast_steps += 1
            used, waiting = scheduler.kv[SMALL].num_used_blocks, list(scheduler.waiting)
            general = scheduler._schedule_general()
            assert (general.seqs, general.num_new_tokens, general.preempted) == (decoding, [1] * len(decoding), [])
            assert scheduler.kv[SMALL].num_used_blocks == used and list(scheduler.waiting) == waiting
        plan = scheduler.schedule()
        assert plan.decodes_only == (decoding is not None)
        run_plan(plan)
    assert 20 < fast_steps < 60, fast_steps  # both kinds of step ran
    assert any(s.stats.num_preemptions for s in seqs)


@pytest.mark.parametrize("case", ["waiting", "block boundary", "large owns", "speculative", "prompt logprobs",
                                  "token budget"])
def test_steps_that_are_not_the_usual_decode_take_the_general_rule(case):
    scheduler = create_scheduler(max_num_batched_tokens=1 if case == "token budget" else 2048)
    policy = {"large owns": "step-entropy:1", "speculative": "speculative:2"}.get(case, "small")
    seqs = create_requests(scheduler, [2, 5], policy)
    for _ in range(4 if case == "token budget" else 1):
        run_plan(scheduler.schedule())  # prefilled: the next step would decode one token each, in held blocks
    if case not in ("token budget", "speculative"):  # (the only thing in the way of the usual step: the change below)
        assert scheduler.decodes() == seqs
    if case == "waiting":
        create_requests(scheduler, [3])
    elif case == "block boundary":  # the next token is the first of a new block
        for seq in seqs:
            seq.token_ids += [7] * ((1 - seq.num_tokens) % BLOCK)  # its blocks hold all its tokens but the last
            seq.num_cached[SMALL] = seq.num_tokens - 1
            scheduler.kv[SMALL].allocate(seq.seq_id, seq.num_cached[SMALL])
    elif case == "large owns":
        seqs[1].step_owner = LARGE
    elif case == "prompt logprobs":
        seqs[0].sampling = SamplingParams(max_tokens=100, prompt_logprobs=1)
    assert scheduler.decodes() is None
    assert not scheduler.schedule().decodes_only


def test_a_sequence_whose_blocks_others_share_too_is_not_preempted_for_room():
    """Prefix caching: a running sequence that holds only blocks another sequence holds too would free nothing
    if preempted; when the pool is short, the youngest sequence with a block of its own goes instead."""
    kv = {SMALL: KVCacheManager(64, BLOCK), LARGE: KVCacheManager(5, BLOCK, prefix_caching=True)}
    scheduler = Scheduler(SchedulerConfig(), kv)
    (old,) = create_requests(scheduler, [8], "entropy:1")
    (sharer,) = create_requests(scheduler, [9], "entropy:1")  # younger; its 8 first tokens are old's
    run_plan(scheduler.schedule())
    scheduler.reserve(LARGE, [old], [old.num_tokens])  # old's first large call: 3 blocks, 2 of them full
    kv[LARGE].register(old.seq_id, old.token_ids, 8)
    scheduler.reserve(LARGE, [sharer], [8])  # finds old's 2 full blocks, needs no block of its own
    assert sharer.num_cached[LARGE] == 8 and not kv[LARGE].frees_blocks(sharer.seq_id)
    preempted = scheduler.reserve(LARGE, [old], [old.num_tokens + 12])  # 3 more blocks: 1 more than are free
    assert preempted == [old] and old.status is Status.WAITING
    assert sharer.status is Status.RUNNING and kv[LARGE].block_table(sharer.seq_id) != []


def test_a_waiting_sequence_is_admitted_on_the_cached_blocks_it_will_find():
    """Prefix caching: admission asks the pool only for the blocks a sequence's cached prefix does not give it."""
    kv = {SMALL: KVCacheManager(5, BLOCK, prefix_caching=True)}
    scheduler = Scheduler(SchedulerConfig(), kv)
    (first,) = create_requests(scheduler, [12])
    run_plan(scheduler.schedule())  # 13 tokens: 4 blocks of 5
    kv[SMALL].register(first.seq_id, first.token_ids, 12)
    (second,) = create_requests(scheduler, [14])  # its 12 first tokens are first's: 1 new block for 15 tokens
    plan = scheduler.schedule()
    assert second in plan.seqs and second.num_cached[SMALL] == 12 and plan.preempted == []
