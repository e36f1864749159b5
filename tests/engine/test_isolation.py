"""One request's failure is its own. Non-finite logits (a model whose weights make one prompt's logits NaN), a
router that raises on one sequence, or an error while committing one sequence's token end that request with
finish reason "error" and a message that says why; the other requests of the same batch produce exactly the
tokens they produce alone, and every KV block comes back free and clean (a later request that gets a failed
request's blocks is not touched by its NaN). A temperature that underflows samples like greedy."""

from __future__ import annotations

import pytest

from collab_decode.engine.sequence import LARGE, SMALL
from collab_decode.sampling import SamplingParams
from tests.utils import DECIDE_FAILS, OBSERVE_FAILS, make_engine, make_poisoned_pair, register_flaky_policy

POISON = 300  # the token id whose input embedding is NaN in both models of the poisoned pair
BAD_PROMPT = [5, POISON] + list(range(20, 38))  # two blocks of 16: freed at the back of the free list
PROMPTS = [[5, 17, 42, 8], [100, 3], [7, 7, 7, 7, 7, 7, 7, 7, 9, 11, 13], [250, 251, 252, 1, 2, 3, 60]]
MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
# greedy and seeded sampling side by side: a failing row must not shift anyone's draws
SAMPLINGS = [GREEDY, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=1, ignore_eos=True),
             GREEDY, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)]
NUM_BLOCKS = 10  # per pool: the innocent requests grow into the blocks the failed one held, in the same run


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """Tiny untied small/large models (the demo tokenizer) whose input embedding of POISON is NaN."""
    return make_poisoned_pair(tmp_path_factory.mktemp("poisoned"), POISON)


def engine_with_blocks(pair, num_blocks: int = NUM_BLOCKS):
    probe = make_engine(*pair, small_kv_bytes=1 << 20, large_kv_bytes=1 << 20)
    per_block = {name: b.kv_bytes_per_token() * probe.config.block_size for name, b in probe.backends.items()}
    return make_engine(*pair, small_kv_bytes=num_blocks * per_block[SMALL],
                       large_kv_bytes=num_blocks * per_block[LARGE])


def run_together(engine, requests: list[tuple[list[int], SamplingParams]], policy: str) -> list:
    """Add the requests in order (the first gets the first blocks of each pool) and step until all end; returns
    their finished Sequences."""
    seqs = [engine.seqs[engine.add_request(prompt, sampling, policy)] for prompt, sampling in requests]
    while engine.has_unfinished():
        engine.step()
    return seqs


def run_alone(engine, policy: str) -> list[list[int]]:
    outputs = []
    for prompt, sampling in zip(PROMPTS, SAMPLINGS):
        (seq,) = run_together(engine, [(prompt, sampling)], policy)
        assert seq.finish_reason == "length", seq.error  # POISON never comes up in these outputs
        outputs.append(seq.output_ids)
    return outputs


def check_all_free(engine):
    assert not engine.has_unfinished() and not engine.seqs
    for name, kv in engine.kv.items():
        assert kv.num_used_blocks == 0, f"{name} pool leaks {kv.num_used_blocks} blocks"


@pytest.mark.parametrize("policy", ["small", "large", "random:0.5", "speculative:3"])
def test_nan_logits_fail_only_their_request(poisoned, policy):
    want = run_alone(engine_with_blocks(poisoned), policy)
    engine = engine_with_blocks(poisoned)
    bad, *innocent = run_together(engine, [(BAD_PROMPT, GREEDY)] + list(zip(PROMPTS, SAMPLINGS)), policy)
    assert bad.finish_reason == "error" and "not finite (NaN or inf)" in bad.error
    assert bad.num_output_tokens == 0
    assert [s.output_ids for s in innocent] == want
    assert all(s.finish_reason == "length" and s.error is None for s in innocent)
    check_all_free(engine)
    # its blocks go to the next requests: zeroed, they change nothing
    again = run_together(engine, list(zip(PROMPTS, SAMPLINGS)), policy)
    assert [s.output_ids for s in again] == want
    check_all_free(engine)


@pytest.mark.parametrize("policy", ["small", "random:0.5"])
def test_nan_logits_while_decoding_fail_only_their_request(poisoned, tmp_path, policy):
    """A request whose NaN comes in while it decodes (one of its own output tokens, poisoned), in the usual step's
    batch: it ends with an error after that token, the others write what they write alone."""
    want = run_alone(engine_with_blocks(poisoned), policy)
    prompt = [400, 401, 402]
    (clean,) = run_together(engine_with_blocks(poisoned), [(prompt, GREEDY)], policy)
    seen = {t for p in PROMPTS + [prompt] for t in p} | {t for out in want for t in out}
    # its first output token from the third on that no other request holds and it has not written before
    k = next(i for i, t in enumerate(clean.output_ids) if i >= 2 and t not in seen | set(clean.output_ids[:i]))
    engine = engine_with_blocks(make_poisoned_pair(tmp_path, clean.output_ids[k]))
    bad, *innocent = run_together(engine, [(prompt, GREEDY)] + list(zip(PROMPTS, SAMPLINGS)), policy)
    assert bad.finish_reason == "error" and "not finite (NaN or inf)" in bad.error
    assert bad.output_ids == clean.output_ids[:k + 1]
    assert [s.output_ids for s in innocent] == want
    assert all(s.finish_reason == "length" and s.error is None for s in innocent)
    check_all_free(engine)


def test_failed_request_ends_with_its_error_through_generate(poisoned):
    engine = engine_with_blocks(poisoned)
    bad, good = engine.generate([BAD_PROMPT, PROMPTS[0]], GREEDY, "small")
    assert (bad.finish_reason, bad.token_ids) == ("error", [])
    assert bad.error == "the small model's logits for this request are not finite (NaN or inf): it cannot go on"
    assert good.finish_reason == "length" and good.error is None and len(good.token_ids) == MAX_TOKENS


@pytest.fixture
def flaky(monkeypatch):
    return register_flaky_policy(monkeypatch)


def test_router_error_fails_only_its_request(pair, flaky):
    seeded = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=i, ignore_eos=True) for i in range(4)]
    reference = engine_with_blocks(pair)
    want = [run_together(reference, [(p, s)], flaky)[0] for p, s in zip(PROMPTS, seeded)]
    assert all(w.finish_reason == "length" for w in want)
    assert 0 < sum(w.stats.num_large_tokens for w in want) < len(want) * MAX_TOKENS  # both models write
    engine = engine_with_blocks(pair)
    failing = [(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=seed, ignore_eos=True))
               for seed in (DECIDE_FAILS, OBSERVE_FAILS)]
    decide_failed, observe_failed, *innocent = run_together(engine, failing + list(zip(PROMPTS, seeded)), flaky)
    assert decide_failed.finish_reason == observe_failed.finish_reason == "error"
    assert decide_failed.error.startswith("internal error while routing this request")
    assert observe_failed.error.startswith("internal error while finishing this request")
    assert "decide failed" not in decide_failed.error  # the traceback goes to the log, not to the client
    assert [(s.output_ids, s.provenance) for s in innocent] == [(w.output_ids, w.provenance) for w in want]
    check_all_free(engine)


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
@pytest.mark.parametrize("policy", ["small", "large", "speculative:3"])
def test_underflowing_temperature_samples_like_greedy(engine, policy, temperature):
    tiny = SamplingParams(max_tokens=8, temperature=temperature, seed=0, ignore_eos=True)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    got = [g.token_ids for g in engine.generate(PROMPTS, tiny, policy)]
    assert got == [g.token_ids for g in engine.generate(PROMPTS, greedy, policy)]
    check_all_free(engine)
