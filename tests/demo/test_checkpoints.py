"""The shipped demo pair loads with transformers and with our loader, and reaches its accuracies on a sample."""

from __future__ import annotations

import pytest
import torch

from collab_decode.demo import checkpoint_dir
from collab_decode.demo.evaluate import evaluate
from collab_decode.engine.loading import build_engine

NUM_SAMPLE = 40


@pytest.mark.parametrize("which", ["small", "large"])
def test_loads_with_transformers_and_native_with_equal_logits(which):
    from transformers import AutoModelForCausalLM

    from collab_decode.models.loader import load_model

    path = checkpoint_dir(which)
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ours = build_engine(path).backends["small"]
    assert load_model(path).config.architecture == "LlamaForCausalLM"
    ids = torch.tensor([[1, 5, 9, 20, 33, 4, 7]])
    from collab_decode.backends.base import ModelInput, SeqChunk

    with torch.no_grad():
        ref = hf(ids).logits[0, -1]
    out = ours.forward(ModelInput([SeqChunk(0, ids[0].tolist(), 0, list(range(8)))]))
    assert (out.logits[0] - ref).abs().max() < 1e-4


def test_small_is_not_accurate():
    small = evaluate(build_engine(checkpoint_dir("small")), NUM_SAMPLE, progress=False)
    assert small["accuracy"] <= 0.80, small["accuracy"]


def test_large_is_accurate():
    # 40 problems: the large model's 95% shows as >= 85% here with high probability
    large = evaluate(build_engine(checkpoint_dir("large")), NUM_SAMPLE, progress=False)
    assert large["accuracy"] >= 0.85, large["accuracy"]
