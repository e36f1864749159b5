"""Shared by the label tests: a tiny random pair (demo tokenizer), engines over it, query files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collab_decode.engine.scheduler import SchedulerConfig
from collab_decode.labels.pipeline import LabelRun, file_sha256
from collab_decode.labels.queries import read_queries
from collab_decode.labels.settings import LabelSettings
from tests.utils import make_engine, make_pair

QUESTIONS = ["Ann has 352 marbles. (a) She finds 179 more. How many marbles does Ann have now?",
             "Ben has 120 coins. (a) He loses 15. How many coins does Ben have now?",
             "Cara has 411 beads.", "Dev has 200 cards. (a) He buys 3 more.", "Eli has 999 shells."]


@pytest.fixture(scope="package")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Larger initial weights than the default, so that the two models' outputs depend on the context and
    disagree often (at the default scale both just repeat the last token: no mismatches)."""
    return make_pair(tmp_path_factory.mktemp("pair"), initializer_range=0.1)


def pair_engine(pair, batch_size: int = 4, **config):
    """An engine over the tiny pair that decodes `batch_size` sequences together."""
    return make_engine(*pair, scheduler=SchedulerConfig(max_num_seqs=batch_size), **config)


@pytest.fixture
def engine(pair):
    return pair_engine(pair)


def write_queries(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_queries(n: int = 5, answers: bool = False) -> list[dict]:
    """n one-message chats (ids q0..), optionally with an answer each."""
    out = []
    for i in range(n):
        record = {"id": f"q{i}", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
        if answers:
            record["answer"] = i
        out.append(record)
    return out


def label_run(engine, query_file: Path, out: Path, **settings) -> LabelRun:
    """A LabelRun over a query file with small defaults (short traces, 2 queries per shard)."""
    settings = {"max_tokens": 16, "continuation_tokens": 4, "shard_size": 2, "top_k": 8, "batch_size": 4,
                "forced_tokens": 64, **settings}
    pair = {"fingerprint": "test-pair"}
    return LabelRun(engine, read_queries(query_file), LabelSettings(**settings), out, pair, file_sha256(query_file),
                    progress=False)


def assert_blocks_free(engine) -> None:
    for name, kv in engine.kv.items():
        assert kv.num_used_blocks == 0, f"{name} pool holds {kv.num_used_blocks} blocks"
