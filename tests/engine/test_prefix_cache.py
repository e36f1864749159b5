"""Prefix caching in the engine (tiny random-init pair): requests whose tokens begin as earlier ones did start their
caches from the cached blocks and write what they write without the cache, alone, batched, preempted and
recomputed; the model scoring a prompt recomputes it; every block returns; a failed request's blocks leave the
cache."""

from __future__ import annotations

import pytest

from collab_decode.sampling import SamplingParams
from tests.utils import make_engine, make_poisoned_pair

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
SHARED = [(7 * i + 20) % 400 for i in range(37)]  # a system prompt: 9 whole blocks of 4 and one token
PROMPTS = [SHARED + [5, 17, 42], SHARED + [100, 3], SHARED + [7, 9, 11, 13, 15], SHARED[:30] + [250, 251]]
POLICIES = ["small", "large", "random:0.3", "confidence:0.0035", "speculative:3"]


# greedy, each request its own seed (random:p draws its routing from it)
SEEDED = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, seed=i) for i in range(len(PROMPTS))]


def outputs(results) -> list[tuple[list[int], list[str]]]:
    return [(r.token_ids, r.provenance) for r in results]


def check_all_free(engine):
    assert not engine.has_unfinished()
    for name, kv in engine.kv.items():
        assert kv.num_used_blocks == 0, f"{name} pool leaks {kv.num_used_blocks} blocks"


@pytest.fixture(scope="module")
def uncached(pair):
    """Each prompt alone, per policy, on an engine without prefix caching."""
    engine = make_engine(*pair, block_size=4, enable_prefix_caching=False)
    return {policy: outputs([engine.generate([p], s, policy)[0] for p, s in zip(PROMPTS, SEEDED)])
            for policy in POLICIES}


@pytest.mark.parametrize("policy", POLICIES)
def test_cached_prefixes_write_what_computed_ones_write(pair, uncached, policy):
    engine = make_engine(*pair, block_size=4)
    samplings = SEEDED
    first = engine.generate(PROMPTS[:1], samplings[:1], policy)  # computes the shared prefix, which stays cached
    assert first[0].stats["cached_tokens"] == 0
    alone = [engine.generate([p], s, policy)[0] for p, s in zip(PROMPTS[1:], samplings[1:])]
    assert outputs(first + alone) == uncached[policy]
    # at most len - 1 tokens come from the cache, in whole blocks: 36 of the shared 37 (the first request's own
    # tokens follow them in block 10), 28 of the last prompt's 30 shared
    assert [r.stats["cached_tokens"] for r in alone] == [36, 36, 28]
    check_all_free(engine)
    batched = engine.generate(PROMPTS, samplings, policy)  # every one now finds its whole prompt's blocks cached
    assert outputs(batched) == uncached[policy]
    assert all(r.stats["cached_tokens"] >= 28 for r in batched)
    check_all_free(engine)


@pytest.mark.parametrize("policy", ["small", "random:0.3", "large"])
def test_a_chats_next_turn_finds_the_answer_it_follows_cached(pair, policy):
    """The blocks a request's output fills (in the usual decode step, or the large model's steps) are cached too:
    a next turn whose prompt holds the first prompt and its answer computes only what follows them."""
    engine = make_engine(*pair, block_size=4)
    answer = SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True)
    (first,) = engine.generate(PROMPTS[:1], answer, policy)
    turn = PROMPTS[0] + first.token_ids + [60, 61, 62]
    (second,) = engine.generate([turn], GREEDY, policy)
    # the first request computed the K/V of its prompt and of every output token but its last: 60 tokens, whose
    # last block its last step filled
    computed = len(PROMPTS[0]) + answer.max_tokens - 1
    assert computed % 4 == 0 and second.stats["cached_tokens"] == computed
    uncached = make_engine(*pair, block_size=4, enable_prefix_caching=False)
    assert second.token_ids == uncached.generate([turn], GREEDY, policy)[0].token_ids
    check_all_free(engine)


def test_sampled_speculative_decoding_caches_only_what_it_commits(pair):
    """Sampled verification rejects drafts: a block that held one is rolled back, never cached."""
    sampled = [SamplingParams(max_tokens=20, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(PROMPTS))]
    uncached = make_engine(*pair, block_size=4, enable_prefix_caching=False)
    want = outputs([uncached.generate([p], s, "speculative:3")[0] for p, s in zip(PROMPTS, sampled)])
    engine = make_engine(*pair, block_size=4)
    for _ in range(2):  # the second time, every prompt and answer is cached
        got = [engine.generate([p], s, "speculative:3")[0] for p, s in zip(PROMPTS, sampled)]
        assert outputs(got) == want and all(r.finish_reason == "length" for r in got)
    assert all(r.stats["cached_tokens"] == (len(p) - 1) // 4 * 4 for r, p in zip(got, PROMPTS))
    check_all_free(engine)


def test_both_models_skip_the_cached_prefix(pair):
    """A routed request: the small model prefills from the cached blocks, the large model's first call catches
    up from its own."""
    engine = make_engine(*pair, block_size=4)
    engine.generate(PROMPTS[:1], GREEDY, "large")  # the large model computes the shared prefix
    engine.generate(PROMPTS[:1], GREEDY, "small")  # and the small model
    small, large = engine.kv["small"], engine.kv["large"]
    hits = small.num_hit_tokens, large.num_hit_tokens
    seq = engine.seqs[engine.add_request(PROMPTS[1], GREEDY, "random:1.0")]  # every token the large model's
    engine.step()
    assert seq.num_cached == {"small": len(PROMPTS[1]), "large": len(PROMPTS[1])}
    assert (small.num_hit_tokens - hits[0], large.num_hit_tokens - hits[1]) == (36, 36)
    while engine.has_unfinished():
        engine.step()
    assert seq.stats.num_cached_tokens == 36 and seq.stats.num_large_tokens == GREEDY.max_tokens
    check_all_free(engine)


def test_prompt_logprobs_are_scored_by_a_model_that_computes_the_prompt(pair):
    engine = make_engine(*pair, block_size=4)
    reference = make_engine(*pair, block_size=4, enable_prefix_caching=False)
    scoring = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2, ignore_eos=True)
    want = [reference.generate([p], scoring, "small")[0] for p in PROMPTS[:2]]
    engine.generate(PROMPTS[:1], GREEDY, "small")
    for prompt, expected in zip(PROMPTS[:2], want):
        seq = engine.seqs[engine.add_request(prompt, scoring, "small")]
        while engine.has_unfinished():
            engine.step()
        assert seq.stats.num_cached_tokens == 0
        assert len(seq.prompt_logprobs) == len(prompt)
        for got, ref in zip(seq.prompt_logprobs[1:], reference_prompt_logprobs(reference, prompt, scoring)):
            assert got[1] == ref[1] and got[0] == pytest.approx(ref[0], abs=1e-5)
        assert seq.output_ids == expected.token_ids
    check_all_free(engine)


def reference_prompt_logprobs(engine, prompt, sampling):
    seq = engine.seqs[engine.add_request(prompt, sampling, "small")]
    while engine.has_unfinished():
        engine.step()
    return seq.prompt_logprobs[1:]


def test_preempted_requests_recompute_from_the_cache(pair, uncached):
    # pools of 18 blocks of 4 tokens cannot hold 4 sequences of ~60 tokens, even sharing 9 blocks: the scheduler
    # must preempt
    engine = make_engine(*pair, block_size=4, small_kv_bytes=72 * 2 * 2 * 2 * 8 * 4,
                         large_kv_bytes=72 * 2 * 3 * 2 * 16 * 4)
    assert engine.kv["small"].pool.num_blocks == 18
    policies = ["small", "random:0.3", "speculative:3", "large"]
    ids = [engine.add_request(p, s, policy) for p, s, policy in zip(PROMPTS, SEEDED, policies)]
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.seq_id] = out.seq
    assert sum(s.stats.num_preemptions for s in finished.values()) > 0
    assert sum(kv.num_hit_tokens for kv in engine.kv.values()) > 0
    for i, policy in enumerate(policies):
        assert (finished[ids[i]].output_ids, finished[ids[i]].provenance) == uncached[policy][i]
    check_all_free(engine)


def test_a_failed_requests_blocks_leave_the_cache(tmp_path):
    """A request whose prompt holds a NaN embedding fails while another request shares its first blocks: its own
    blocks are cleared and leave the cache, the shared ones keep their K/V (the other request writes what it
    would anyway), and a later request with its tokens finds only the shared blocks."""
    poison = 300
    pair = make_poisoned_pair(tmp_path, poison)
    engine = make_engine(*pair, block_size=4)
    want = make_engine(*pair, block_size=4, enable_prefix_caching=False).generate(PROMPTS[:2], GREEDY, "small")
    good = engine.seqs[engine.add_request(PROMPTS[0], GREEDY, "small")]
    engine.step()  # its prompt computed: the shared prefix's blocks are cached, and it holds them
    small = engine.kv["small"]
    hits = small.num_hit_tokens
    bad_prompt = SHARED + [1, 2, poison, 4, 5, 6, 7, 8, 9]
    bad = engine.seqs[engine.add_request(bad_prompt, GREEDY, "small")]
    while engine.has_unfinished():
        engine.step()
    assert small.num_hit_tokens - hits == 36
    assert bad.finish_reason == "error" and good.output_ids == want[0].token_ids
    check_all_free(engine)
    again = engine.seqs[engine.add_request(bad_prompt[:-1] + [0], GREEDY, "small")]
    engine.step()
    assert small.num_hit_tokens - hits == 72  # 36 again: none of the blocks that held the NaN
    while engine.has_unfinished():
        engine.step()
    assert again.finish_reason == "error"
    assert outputs(engine.generate(PROMPTS[1:2], GREEDY, "small")) == outputs(want[1:])
    check_all_free(engine)


def test_the_flag_turns_it_off(tmp_path):
    poison = 300
    pair = make_poisoned_pair(tmp_path, poison)
    engine = make_engine(*pair, block_size=4, enable_prefix_caching=False)
    engine.generate(PROMPTS[:2], GREEDY, "random:0.3")
    assert not any(kv.prefix_caching for kv in engine.kv.values())
    assert engine.generate(PROMPTS[1:2], GREEDY, "small")[0].stats["cached_tokens"] == 0
    bad, good = engine.generate([SHARED + [poison, 1], PROMPTS[0]], GREEDY, "small")  # a failure clears its blocks
    assert bad.finish_reason == "error" and good.finish_reason == "length"
    check_all_free(engine)


def test_a_large_request_looks_its_prompt_up_once(pair):
    engine = make_engine(*pair, block_size=4)
    engine.generate(PROMPTS[:1], GREEDY, "large")
    large = engine.kv["large"]
    assert (large.num_queried_tokens, large.num_hit_tokens, engine.kv["small"].num_queried_tokens) == \
        (len(PROMPTS[0]), 0, 0)


def test_requests_arriving_together_prefill_a_shared_prompt_once(pair, uncached):
    """Requests that begin the same and arrive together: the first is admitted and computes the shared blocks; the
    others wait one step and find them cached (the n choices of one prompt, a burst with one system prompt)."""
    engine = make_engine(*pair, block_size=4)
    samplings = SEEDED
    seqs = [engine.seqs[engine.add_request(p, s, "small")] for p, s in zip(PROMPTS, samplings)]
    engine.step()
    assert [s.status.value for s in seqs] == ["running", "waiting", "waiting", "waiting"]
    while engine.has_unfinished():
        engine.step()
    assert [s.stats.num_cached_tokens for s in seqs] == [0, 36, 36, 28]
    assert [(s.output_ids, s.provenance) for s in seqs] == uncached["small"]
    check_all_free(engine)
