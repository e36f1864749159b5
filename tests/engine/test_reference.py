"""Routed decoding against a reference that shares none of the engine's code path.

The reference decodes one token at a time with transformers, recomputing both models over the whole
sequence each step (no cache, no batching, no scheduler), applies the routing rule to the small model's
distribution, and takes the large model's argmax where the rule routes. The engine must give the same
tokens and the same provenance (each position `large` exactly where the rule says so), alone, batched,
and batched under KV pools so small that sequences are preempted and recomputed mid-generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from collab_decode.sampling import SamplingParams
from tests.utils import make_engine, make_pair

NUM_TOKENS = 24
PROMPTS = [[5, 17, 42, 8], [100, 3], [7, 7, 7, 7, 7, 7, 7, 7, 9, 11, 13], [250, 251, 252, 1, 2, 3, 60]]
SEEDS = [11, 12, 13, 14]  # one per prompt: seeds random routing; greedy tokens use no randomness
NUM_CANDIDATES = 12  # thresholds tried per rule


def entropy_of(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.double(), -1)
    return float(-(logp.exp() * logp).sum())


def top1_prob(logits: torch.Tensor) -> float:
    return float(torch.softmax(logits.double(), -1).max())


@dataclass
class Trace:
    token_ids: list[int]
    provenance: list[str]
    margin: float  # smallest |signal - threshold| over the decisions taken (how well-posed the comparison is)


class Reference:
    """Both models as plain transformers modules, full recompute per token."""

    def __init__(self, pair, tokenizer, vocab_size: int):
        from transformers import AutoModelForCausalLM

        self.small = AutoModelForCausalLM.from_pretrained(str(pair[0])).eval()
        self.large = AutoModelForCausalLM.from_pretrained(str(pair[1])).eval()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @torch.no_grad()
    def next_logits(self, model, tokens: list[int]) -> torch.Tensor:
        return model(torch.tensor([tokens])).logits[0, -1, :self.vocab_size]

    def decode(self, prompt: list[int], rule: str, threshold: float, seed: int = 0,
               delimiter: str = "\n\n") -> Trace:
        """Greedy decoding where `rule` (entropy | confidence | random | step-entropy) picks the writer."""
        tokens, provenance, margin = list(prompt), [], float("inf")
        rng = torch.Generator().manual_seed(seed)  # random routing: one draw per decision, the request's seed
        at_step_start, owner = True, "small"
        for _ in range(NUM_TOKENS):
            if rule == "step-entropy" and not at_step_start and owner == "large":
                routed = True  # inside a large-owned step the small model is not asked
            else:
                small_logits = self.next_logits(self.small, tokens)
                if rule == "entropy" or rule == "step-entropy":
                    signal = entropy_of(small_logits)
                    routed = signal > threshold
                elif rule == "confidence":
                    signal = top1_prob(small_logits)
                    routed = signal < threshold
                else:
                    signal = float(torch.rand((), generator=rng))
                    routed = signal < threshold
                if rule == "step-entropy":
                    if at_step_start:
                        owner = "large" if routed else "small"
                        margin = min(margin, abs(signal - threshold))
                    routed = at_step_start and routed
                else:
                    margin = min(margin, abs(signal - threshold))
            logits = self.next_logits(self.large, tokens) if routed else small_logits
            tokens.append(int(logits.argmax()))
            provenance.append("large" if routed else "small")
            text = self.tokenizer.decode(tokens[len(prompt):], skip_special_tokens=True)
            at_step_start = text.endswith(delimiter)
        return Trace(tokens[len(prompt):], provenance, margin)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny pair with large random weights: near-uniform outputs of a default init barely depend on the
    context (a stale or missing cache entry would not show); these do, and their entropies spread."""
    return make_pair(tmp_path_factory.mktemp("sharp-pair"), initializer_range=0.3)


@pytest.fixture(scope="module")
def engine(pair):
    return make_engine(*pair)


@pytest.fixture(scope="module")
def reference(pair, engine):
    return Reference(pair, engine.tokenizer, engine.vocab_size)


@pytest.fixture(scope="module")
def delimiter(reference):
    """A step delimiter the tiny models actually write every few tokens: the most common last character of
    the small model's greedy output tokens (the random-init models never write "\\n\\n")."""
    from collections import Counter

    counts = Counter()
    for prompt in PROMPTS:
        for token in reference.decode(prompt, "entropy", float("inf")).token_ids:
            text = reference.tokenizer.decode([token], skip_special_tokens=True)
            if text and text[-1].isprintable() and text[-1] != "\ufffd":  # not half a UTF-8 character
                counts[text[-1]] += 1
    return counts.most_common(1)[0][0]


def signals(reference, rule: str) -> list[float]:
    """The rule's signal along the small model's own greedy paths (where thresholds are picked from)."""
    fn = top1_prob if rule == "confidence" else entropy_of
    values = []
    for prompt in PROMPTS:
        path = prompt + reference.decode(prompt, "entropy", float("inf")).token_ids
        with torch.no_grad():
            logits = reference.small(torch.tensor([path])).logits[0, len(prompt) - 1:, :reference.vocab_size]
        values += [fn(row) for row in logits]
    return sorted(values)


@pytest.fixture(scope="module")
def cases(reference, delimiter):
    """rule -> (policy string, reference traces per prompt). Candidate thresholds are the midpoints of the
    widest gaps between neighbouring signal values in the middle of their range; the one chosen routes some
    tokens but not all and has its reference decisions farthest from it (engine and transformers logits
    differ in the last bits, so a decision must not hang on them)."""
    chosen = {}
    for rule in ("entropy", "confidence", "step-entropy"):
        values = signals(reference, rule)
        middle = values[len(values) // 10: 9 * len(values) // 10]
        gaps = sorted(zip(middle, middle[1:]), key=lambda g: g[0] - g[1])[:NUM_CANDIDATES]
        best = None
        for lo, hi in gaps:
            t = round((lo + hi) / 2, 7)
            traces = [reference.decode(p, rule, t, delimiter=delimiter) for p in PROMPTS]
            share = sum(tr.provenance.count("large") for tr in traces) / (NUM_TOKENS * len(PROMPTS))
            margin = min(tr.margin for tr in traces)
            if 0.15 < share < 0.85 and (best is None or margin > best[0]):
                best = (margin, f"{rule}:{t}", traces)
        assert best is not None and best[0] > 1e-4, f"no well-posed threshold for {rule}"
        chosen[rule] = (best[1], best[2])
    p = 0.3
    chosen["random"] = (f"random:{p}", [reference.decode(pr, "random", p, seed=s) for pr, s in zip(PROMPTS, SEEDS)])
    return chosen


def sampling_for(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True, seed=SEEDS[i])


def check_matches(results, traces):
    for i, (result, trace) in enumerate(zip(results, traces)):
        assert result.token_ids == trace.token_ids, f"prompt {i}: tokens differ from the reference"
        assert result.provenance == trace.provenance, f"prompt {i}: provenance differs from the reference"


def check_all_free(engine):
    assert not engine.has_unfinished()
    for name, kv in engine.kv.items():
        assert kv.num_used_blocks == 0, f"{name} pool leaks {kv.num_used_blocks} blocks"


RULES = ["entropy", "confidence", "step-entropy", "random"]


@pytest.mark.parametrize("rule", RULES)
def test_routed_decoding_equals_reference_alone(pair, rule, cases, delimiter):
    policy, traces = cases[rule]
    engine = make_engine(*pair, step_delimiter=delimiter)
    results = [engine.generate([p], sampling_for(i), policy)[0] for i, p in enumerate(PROMPTS)]
    assert {"small", "large"} <= {s for t in traces for s in t.provenance}  # the rule really mixes writers
    check_matches(results, traces)
    check_all_free(engine)


@pytest.mark.parametrize("rule", RULES)
def test_routed_decoding_equals_reference_batched(pair, rule, cases, delimiter):
    policy, traces = cases[rule]
    engine = make_engine(*pair, step_delimiter=delimiter)
    results = engine.generate(PROMPTS, [sampling_for(i) for i in range(len(PROMPTS))], policy)
    check_matches(results, traces)
    check_all_free(engine)


@pytest.mark.parametrize("rule", RULES)
def test_routed_decoding_equals_reference_under_preemption(pair, rule, cases, delimiter):
    """Pools of 14 blocks of 4 tokens cannot hold four sequences of up to 35 tokens: sequences are preempted
    (both caches dropped) and recompute, small and large alike, to the same tokens and provenance."""
    policy, traces = cases[rule]
    # K+V bytes per token: small 2 layers x 2 kv heads x 8 dims, large 3 x 2 x 16, float32
    engine = make_engine(*pair, step_delimiter=delimiter, block_size=4, small_kv_bytes=14 * 4 * 2 * 2 * 2 * 8 * 4,
                         large_kv_bytes=14 * 4 * 2 * 3 * 2 * 16 * 4)
    assert engine.kv["small"].pool.num_blocks == engine.kv["large"].pool.num_blocks == 14
    results = engine.generate(PROMPTS, [sampling_for(i) for i in range(len(PROMPTS))], policy)
    assert sum(r.stats["preemptions"] for r in results) > 0
    check_matches(results, traces)
    check_all_free(engine)
