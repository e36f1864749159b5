"""The mismatch analysis on the shipped demo pair: teacher forcing agrees with decoding, and the counts add up."""

from __future__ import annotations

import pytest
import torch

from collab_decode.demo import checkpoint_dir
from collab_decode.demo.mismatch import analyse, teacher_forced_top1
from collab_decode.demo.task import problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.engine.loading import build_engine
from collab_decode.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine():
    return build_engine(checkpoint_dir("small"), checkpoint_dir("large"))


@torch.inference_mode()
def test_teacher_forced_top1_is_the_small_models_greedy_continuation(engine):
    """Fed its own greedy output, the small model's top-1 at every position is the token it wrote."""
    question = problems("heldout", 1, 7)[0].question
    prompt = engine.tokenizer(chat_prompt(question), add_special_tokens=False)["input_ids"]
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), "small")[0]
    top1 = teacher_forced_top1(engine, prompt + out.token_ids)
    assert len(top1) == len(prompt) + len(out.token_ids)
    assert top1[len(prompt) - 1:-1] == out.token_ids
    assert engine.kv["small"].num_used_blocks == 0  # the private sequence's blocks came back


@torch.inference_mode()
def test_every_mismatch_is_continued_and_labelled_once(engine):
    report = analyse(engine, num_problems=1, offset=0, progress=False, max_continuations=1000)
    assert report["num_right_traces"] == 1  # the large model is right on ~99%, and on this one
    assert report["num_positions"] > 0 and report["num_mismatches"] > 0
    assert report["num_continued"] == report["num_mismatches"] == report["neutral"] + report["divergent"]
    assert sum(report["by_token_kind"].values()) == report["num_continued"]
    n = report["num_positions"]
    assert report["neutral_rate"] == pytest.approx(report["neutral"] / n)
    assert report["divergent_rate"] == pytest.approx(report["divergent"] / n)
    # a sample of 3 continued: rates scaled back to all mismatches
    sampled = analyse(engine, num_problems=1, offset=0, progress=False, max_continuations=3)
    assert sampled["num_continued"] == 3 and sampled["num_mismatches"] == report["num_mismatches"]
    scale = sampled["num_mismatches"] / 3
    assert sampled["neutral_rate"] == pytest.approx(scale * sampled["neutral"] / n)
