"""Prompt logprobs (what a collab-decode server answers to `prompt_logprobs` and to `echo` with `logprobs`, so
that it can be another one's remote large model and lm-evaluation-harness can score with it): per prompt token
its logprob given the tokens before it, its rank and the top n there, from the large model unless the request
is routed `small`; the same whether the prompt is prefilled in one chunk or several, equal to a full forward of
that model in transformers, and asking for them never changes the output."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from collab_decode.engine.scheduler import SchedulerConfig
from collab_decode.sampling import SamplingParams
from tests.utils import make_engine, make_pair

PROMPT = [5, 9, 23, 41, 7, 7, 30, 12, 40, 8, 19, 3, 33, 2, 17, 60, 4]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def scored(engine, policy: str, n: int = 3):
    seq_id = engine.add_request(PROMPT, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=n), policy)
    seq = engine.seqs[seq_id]
    while not seq.finished:
        engine.step()
    return seq.prompt_logprobs


def reference(model_dir, n: int = 3):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([PROMPT])).logits[0].float().log_softmax(-1)  # (T, V)
    out = [None]
    for i in range(1, len(PROMPT)):
        row = logprobs[i - 1]
        top = row.topk(n)
        out.append((float(row[PROMPT[i]]), int((row > row[PROMPT[i]]).sum()) + 1,
                    list(zip(top.indices.tolist(), top.values.tolist()))))
    return out


def assert_close(got, want):
    assert len(got) == len(want) == len(PROMPT) and got[0] is None
    for (lp, rank, top), (lp_ref, rank_ref, top_ref) in zip(got[1:], want[1:]):
        assert lp == pytest.approx(lp_ref, abs=1e-4) and rank == rank_ref
        assert [t for t, _ in top] == [t for t, _ in top_ref]
        assert [x for _, x in top] == pytest.approx([x for _, x in top_ref], abs=1e-4)


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 5])  # one chunk, or chunks of 5
def test_prompt_logprobs_of_the_large_model_unless_routed_small(pair, max_num_batched_tokens):
    engine = make_engine(*pair, scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens))
    small, large = reference(pair[0]), reference(pair[1])
    assert_close(scored(engine, "small"), small)
    assert_close(scored(engine, "large"), large)  # only the large model runs
    # the small model prefills (and writes) first; the large model prefills the prompt eagerly to score it
    for policy in ("entropy:100", "entropy:0.5", "step-entropy:100", "speculative:3"):
        assert_close(scored(engine, policy), large)
    assert all(kv.pool.num_free == kv.pool.num_blocks for kv in engine.kv.values())


@pytest.mark.parametrize("policy", ["entropy:100", "entropy:0.5", "speculative:2"])
def test_asking_for_prompt_logprobs_changes_no_output(pair, policy):
    engine = make_engine(*pair)
    plain, asked = (engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=n),
                                    policy)[0] for n in (None, 2))
    assert asked.token_ids == plain.token_ids and asked.provenance == plain.provenance
    assert asked.stats["large_tokens"] == plain.stats["large_tokens"]


def test_each_prompt_position_scored_once_across_preemption(pair):
    """Pools of 6 blocks of 8 tokens admit two 17-token prompts (3 blocks each); when the older one grows into
    a fourth block the younger one is preempted and recomputed: its prompt is scored once, and right."""
    probe = make_engine(*pair)
    kv_bytes = {f"{name}_kv_bytes": 6 * 8 * b.kv_bytes_per_token() for name, b in probe.backends.items()}
    engine = make_engine(*pair, block_size=8, **kv_bytes)
    ids = [engine.add_request(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=1), "entropy:0.5")
           for _ in range(2)]
    seqs = [engine.seqs[i] for i in ids]
    while engine.has_unfinished():
        engine.step()
    assert seqs[1].stats.num_preemptions >= 1
    large = reference(pair[1], n=1)
    for seq in seqs:
        assert_close(seq.prompt_logprobs, large)
    assert all(kv.pool.num_free == kv.pool.num_blocks for kv in engine.kv.values())


def test_no_prompt_logprobs_unless_asked_and_zero_means_the_token_only(pair):
    engine = make_engine(*pair)
    seq_id = engine.add_request(PROMPT, SamplingParams(max_tokens=1, temperature=0.0), "small")
    seq = engine.seqs[seq_id]
    while not seq.finished:
        engine.step()
    assert seq.prompt_logprobs == []
    entries = scored(engine, "small", n=0)
    assert all(top == [] for _, _, top in entries[1:])
