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
