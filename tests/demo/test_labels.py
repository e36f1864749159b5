"""Routing labels on the shipped demo pair (what `collab-decode label --pair demo` runs): teacher forcing agrees
with decoding, and on a right trace every mismatch is continued and labelled neutral or divergent."""

from __future__ import annotations

import json

import pytest
import torch

from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.engine.loading import build_engine
from collab_decode.labels.forcing import teacher_force
from collab_decode.labels.pipeline import LabelRun, file_sha256
from collab_decode.labels.queries import read_queries
from collab_decode.labels.settings import LabelSettings
from collab_decode.labels.traces import Trace
from collab_decode.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine():
    return build_engine(checkpoint_dir("small"), checkpoint_dir("large"))


@torch.inference_mode()
def test_teacher_forcing_reproduces_the_small_models_greedy_decode(engine):
    """Fed its own greedy output, the small model's top-1 at every position is the token it wrote."""
    question = problems("heldout", 1, 7)[0].question
    prompt = engine.tokenizer(chat_prompt(question), add_special_tokens=False)["input_ids"]
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), "small")[0]
    rows = teacher_force(engine, [Trace(0, prompt, out.token_ids, "length")], top_k=16, max_tokens_per_forward=32)
    assert rows.small_top1.tolist() == out.token_ids and not rows.mismatch.any()
    assert engine.kv["small"].num_used_blocks == 0  # the private sequences' blocks came back


def test_every_mismatch_of_a_right_trace_is_continued_and_labelled(engine, tmp_path, capsys):
    from collab_decode.cli import main

    queries = tmp_path / "q.jsonl"
    assert main(["demo", "queries", "--num", "1", "--offset", "3", "--out", str(queries)]) == 0
    settings = LabelSettings(answer_checker="collab_decode.demo.task:is_correct")
    run = LabelRun(engine, read_queries(queries), settings, tmp_path / "out", {"fingerprint": "demo"},
                   file_sha256(queries), progress=False)
    manifest = run.run()
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert manifest["complete"] and stats["trace_finish_reasons"] == {"stop": 1}
    counts = stats["counts"]
    assert counts["skipped"] == counts["unparsed"] == 0  # the large model's trace is right: all labelled
    assert stats["num_mismatches"] == counts["neutral"] + counts["divergent"] > 0
    assert all(kv.num_used_blocks == 0 for kv in engine.kv.values())
