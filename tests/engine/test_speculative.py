"""Speculative decoding past the first token.

Sampled (tiny random pair): every output token, drafted and accepted, resampled after a rejection, or the
bonus token after k accepted drafts, follows the large model's conditional distribution given the prefix
sampled so far (chi-square against transformers' large model). Greedy (demo pair, whose models agree on
most tokens, so drafts are long): drafts cut by max_tokens, by EOS or by a stop token end the output
exactly where the large model alone would, and return every KV block.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import pytest
import torch

from collab_decode.sampling import SamplingParams
from tests.utils import make_engine

TEMPERATURE, TOP_K = 0.1, 5  # sharpens the tiny random models' near-uniform distributions so p and q differ
NUM_SEEDS = 4000
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}  # p = 0.001 by degrees of freedom
PROMPT = [75, 390, 52, 320]  # one where p and q differ and acceptance is frequent (both asserted below)


@pytest.fixture(scope="module")
def hf(pair):
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(str(path)).eval()
            for name, path in zip(("small", "large"), pair)}


@pytest.fixture(scope="module")
def runs(engine):
    """speculative:k over NUM_SEEDS seeds, k + 2 tokens each (one batch per k, computed once)."""
    @lru_cache
    def run(k):
        sampling = [SamplingParams(max_tokens=k + 2, temperature=TEMPERATURE, top_k=TOP_K, seed=s, ignore_eos=True)
                    for s in range(NUM_SEEDS)]
        results = engine.generate([PROMPT] * NUM_SEEDS, sampling, f"speculative:{k}")
        assert all(kv.num_used_blocks == 0 for kv in engine.kv.values())
        return results
    return run


def target(model, context: list[int]) -> torch.Tensor:
    """The model's sampling distribution after `context`: temperature, top-k, renormalised. (V,)"""
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1] / TEMPERATURE
    top = logits.topk(TOP_K)
    return torch.zeros_like(logits).index_put_((top.indices,), top.values.softmax(-1))


def check_distribution(samples: list[int], p: torch.Tensor) -> None:
    """Chi-square of the sampled tokens against p; cells expecting fewer than 5 counts are pooled."""
    assert len(samples) >= 300, f"too few samples ({len(samples)}) to test a distribution"
    support = p.nonzero().flatten().tolist()
    assert set(samples) <= set(support), f"tokens outside the large model's top-{TOP_K}: {set(samples) - set(support)}"
    counts = Counter(samples)
    expected = {t: float(p[t]) * len(samples) for t in support}
    big = [t for t in support if expected[t] >= 5]
    cells = [(counts[t], expected[t]) for t in big]
    small = [t for t in support if t not in big]
    if small:
        cells.append((sum(counts[t] for t in small), sum(expected[t] for t in small)))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    assert chi2 < CHI2_CRITICAL[len(cells) - 1], (chi2, [(t, counts[t], round(expected[t])) for t in support])


def most_frequent_prefix(results, n: int, where=lambda r: True) -> tuple[int, ...]:
    return Counter(tuple(r.token_ids[:n]) for r in results if where(r)).most_common(1)[0][0]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p - q).abs().sum()) / 2


@pytest.mark.parametrize("k", [2, 3])
def test_every_output_token_follows_the_large_models_conditional(runs, hf, k):
    """Token j (j = 0 .. k+1: drafts, resampled tokens, bonus tokens and the next step's first token), among
    the runs whose first j tokens are the most frequent such prefix, ~ large-model p(. | prompt + prefix)."""
    prompt, results = PROMPT, runs(k)
    for j in range(k + 2):
        prefix = most_frequent_prefix(results, j)
        context = prompt + list(prefix)
        p = target(hf["large"], context)
        if j <= 1:  # the small model's draft distribution differs, so acceptance and resampling matter
            assert total_variation(p, target(hf["small"], context)) > 0.2
        check_distribution([r.token_ids[j] for r in results if tuple(r.token_ids[:j]) == prefix], p)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bonus_token_follows_the_large_model_after_the_last_draft(runs, hf, k):
    """When the first step keeps all k drafts (provenance: k small tokens, then a large one), the large
    model's extra token is drawn from p(. | prompt + drafts), the position after the last draft."""
    prompt, results = PROMPT, runs(k)
    accepted = [r for r in results if r.provenance[:k + 1] == ["small"] * k + ["large"]]
    drafts = most_frequent_prefix(accepted, k)
    p = target(hf["large"], prompt + list(drafts))
    # the distribution one position earlier is far from it: a bonus drawn there would show
    assert total_variation(p, target(hf["large"], prompt + list(drafts[:-1]))) > 0.15
    check_distribution([r.token_ids[k] for r in accepted if tuple(r.token_ids[:k]) == drafts], p)
    # and, on the same runs, the runs that rejected a draft in step one resampled it (provenance large)
    assert any(r.provenance[0] == "large" for r in results)


# ---- greedy, on the demo pair -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    """The demo engine, a chat prompt, and the demo large model's greedy answer (transformers), EOS included."""
    from transformers import AutoModelForCausalLM

    from collab_decode.demo import checkpoint_dir
    from collab_decode.demo.task import problems
    from collab_decode.demo.tokenizer import chat_prompt

    engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"))
    prompt = engine.tokenizer(chat_prompt(problems("heldout", 1)[0].question))["input_ids"]
    large = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir("large"))).eval()
    eos = large.config.eos_token_id
    with torch.no_grad():
        out = large.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=400, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    reference = out[0, len(prompt):].tolist()
    assert reference[-1] == eos
    return engine, prompt, reference


def check_all_free(engine):
    assert not engine.has_unfinished()
    for name, kv in engine.kv.items():
        assert kv.num_used_blocks == 0, f"{name} pool leaks {kv.num_used_blocks} blocks"


def test_greedy_drafts_cut_by_max_tokens_equal_the_large_model(demo):
    engine, prompt, reference = demo
    for k in (3, 4):
        for max_tokens in range(1, 12):  # ends at every offset inside a draft
            result = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                     f"speculative:{k}")[0]
            assert result.token_ids == reference[:max_tokens], (k, max_tokens)
            assert result.finish_reason == "length"
            check_all_free(engine)
        assert "small" in result.provenance  # drafts were kept: the cut fell inside accepted drafts


def test_greedy_request_filling_the_context_equals_the_large_model(demo):
    from collab_decode.demo import checkpoint_dir
    from collab_decode.engine.scheduler import SchedulerConfig

    _, prompt, reference = demo
    engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"),
                         scheduler=SchedulerConfig(max_model_len=len(prompt) + 10))
    result = engine.generate([prompt], SamplingParams(max_tokens=engine.max_tokens_left(len(prompt)),
                                                      temperature=0.0), "speculative:4")[0]
    assert result.token_ids == reference[:10] and result.finish_reason == "length"
    check_all_free(engine)


def test_eos_inside_an_accepted_draft_ends_the_output(demo):
    """With k = 4 the demo answer's EOS is a draft the large model accepts, with drafts after it in the same
    step: the output ends at EOS, exactly the large model's answer."""
    engine, prompt, reference = demo
    result = engine.generate([prompt], SamplingParams(max_tokens=400, temperature=0.0), "speculative:4")[0]
    assert result.provenance[-1] == "small"  # EOS came as an accepted draft, not as the large model's token
    assert result.token_ids == reference and result.finish_reason == "stop"
    check_all_free(engine)


@pytest.mark.parametrize("k", [3, 4])
def test_stop_token_inside_an_accepted_draft_ends_the_output(demo, k):
    engine, prompt, reference = demo
    full = engine.generate([prompt], SamplingParams(max_tokens=400, temperature=0.0), f"speculative:{k}")[0]
    assert full.token_ids == reference
    # a token seen for the first time, an accepted draft (so its step committed more tokens after it)
    j = next(i for i in range(10, len(reference))
             if reference[i] not in reference[:i] and full.provenance[i] == "small")
    result = engine.generate([prompt], SamplingParams(max_tokens=400, temperature=0.0,
                                                      stop_token_ids=(reference[j],)), f"speculative:{k}")[0]
    assert result.token_ids == reference[:j + 1] and result.finish_reason == "stop"
    assert result.provenance == full.provenance[:j + 1]
    check_all_free(engine)
