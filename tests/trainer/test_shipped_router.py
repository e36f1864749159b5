"""The shipped demo router loads for the demo pair (its fingerprint matches), refuses another pair, and
routes held-out demo problems to right answers with a small large share."""

from __future__ import annotations

from pathlib import Path

import pytest

from collab_decode.sampling import SamplingParams
from tests.utils import make_engine, save_tiny_lm

ROUTER = Path(__file__).resolve().parents[2] / "router_models" / "demo"


def test_demo_router_routes_held_out_problems():
    from collab_decode.demo import checkpoint_dir
    from collab_decode.demo.task import is_correct, problems
    from collab_decode.demo.tokenizer import chat_prompt

    engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"), routers={"demo": ROUTER})
    probs = problems("heldout", 8)
    results = engine.generate([chat_prompt(p.question) for p in probs],
                              SamplingParams(max_tokens=400, temperature=0.0), "neural:demo")
    assert all(is_correct(r.text, p.answer) for r, p in zip(results, probs))
    share = sum(r.stats["large_tokens"] for r in results) / sum(len(r.token_ids) for r in results)
    assert 0 < share < 0.1


def test_demo_router_is_refused_for_another_pair(tmp_path):
    """Same tokenizer and hidden size as the demo small model, other weights' config: the fingerprint differs."""
    small = save_tiny_lm(tmp_path / "small", seed=1, hidden=64)
    with pytest.raises(ValueError, match="another pair"):
        make_engine(small, save_tiny_lm(tmp_path / "large", seed=2, hidden=64), routers={"demo": ROUTER})



def test_the_gate_decides_the_same_from_the_samplers_top1(monkeypatch):
    """A greedy batch of a gated router's sequences gets its top-1 probabilities from the sampler's one softmax,
    and its tokens from that softmax's max where the top-1 probability is clear (the logits' max elsewhere). The
    tokens and provenance must be those of the sampler taking the logits' max and the gate computing its own
    softmax, batched and alone, with both kinds of row (clear and not) met along the way."""
    from collab_decode.demo import checkpoint_dir
    from collab_decode.demo.task import problems
    from collab_decode.demo.tokenizer import chat_prompt
    from collab_decode.engine.runner import ModelRunner
    from collab_decode.sampling import Sampler, clear_top1

    engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"), routers={"demo": ROUTER})
    prompts = [chat_prompt(p.question) for p in problems("heldout", 6)]
    greedy = SamplingParams(max_tokens=150, temperature=0.0)

    def run() -> tuple[list, list]:
        batched = engine.generate(prompts, greedy, "neural:demo")
        alone = [engine.generate([p], greedy, "neural:demo")[0] for p in prompts[:2]]
        return [(r.token_ids, r.provenance) for r in batched], [(r.token_ids, r.provenance) for r in alone]

    seen, sample = [], Sampler.sample

    def recording(self, logits, params, generators, top1=False):
        out = sample(self, logits, params, generators, top1)
        seen.extend(out.top1_probs or [])
        return out

    monkeypatch.setattr(Sampler, "sample", recording)
    fused_batched, fused_alone = run()
    clear = clear_top1(engine.vocab_size)
    assert any(p > clear for p in seen) and any(p <= clear for p in seen)  # both ways were taken
    assert any("large" in provenance for _, provenance in fused_batched)  # and the router routed
    runner_sample = ModelRunner.sample
    monkeypatch.setattr(ModelRunner, "sample", lambda self, logits, seqs, top1=False: runner_sample(self, logits, seqs))
    assert run() == (fused_batched, fused_alone)
    assert fused_alone == fused_batched[:2]
