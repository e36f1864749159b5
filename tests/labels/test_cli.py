"""`collab-decode label` and `collab-decode demo queries` from the command line: a complete --help, a run on a
tiny pair, and clear errors (exit 2) for a bad query file, a missing pair and a pair without a shared tokenizer."""

from __future__ import annotations

import dataclasses
import json

import pytest

from collab_decode.cli import main
from collab_decode.demo.task import is_correct, problems
from collab_decode.labels.dataset import read_dataset
from collab_decode.labels.queries import read_queries
from collab_decode.labels.settings import LabelSettings
from tests.labels.conftest import chat_queries, write_queries
from tests.utils import save_lm_with_swapped_ids


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_setting_and_stage(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(LabelSettings):
        assert "--" + f.name.replace("_", "-") in text
    for flag in ("--pair", "--small", "--large", "--queries", "--out", "--steps", "--judge-api-key", "--threads",
                 "--kv-memory", "traces", "forcing", "continuations", "verify", "dataset"):
        assert flag in text


def test_label_a_tiny_pair(capsys, pair, tmp_path):
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(3))
    args = ["label", "--small", pair[0], "--large", pair[1], "--queries", queries, "--out", tmp_path / "out",
            "--verifier", "exact", "--max-tokens", 8, "--continuation-tokens", 3, "--top-k", 4, "--shard-size", 2,
            "--threads", 1]
    code, out, err = cli(capsys, *args, "--steps", "0-1")
    assert code == 0 and "not finished" in out and "[forcing] shard 2/2" in err
    code, out, err = cli(capsys, *args, "--quiet")
    assert code == 0 and "3 queries" in out and "divergent" in out and err.count("\r") == 0
    data = read_dataset(tmp_path / "out")
    assert data.manifest["settings"]["top_k"] == 4 and data.manifest["pair"]["fingerprint"].startswith("sha256:")


def test_clear_errors(capsys, pair, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "b"}\n')
    base = ["label", "--small", pair[0], "--large", pair[1], "--out", tmp_path / "out"]
    code, _, err = cli(capsys, *base, "--queries", bad)
    assert code == 2 and f"{bad}:2:" in err and "exactly one of" in err
    good = write_queries(tmp_path / "q.jsonl", chat_queries(1))
    code, _, err = cli(capsys, "label", "--small", pair[0], "--queries", good, "--out", tmp_path / "out")
    assert code == 2 and "label needs a pair" in err
    code, _, err = cli(capsys, *base, "--queries", good, "--verifier", "judge")
    assert code == 2 and "needs judge_url and judge_model" in err
    code, _, err = cli(capsys, *base, "--queries", good, "--answer-checker", "nope")
    assert code == 2 and "module:function" in err


def test_a_pair_without_a_shared_tokenizer_is_refused(capsys, pair, tmp_path):
    other = save_lm_with_swapped_ids(tmp_path / "other")
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(1))
    code, _, err = cli(capsys, "label", "--small", pair[0], "--large", other, "--queries", queries,
                       "--out", tmp_path / "out")
    assert code == 2 and "do not share a tokenizer" in err
    assert not (tmp_path / "out").exists()


def test_demo_queries_are_training_problems_in_the_query_format(capsys, tmp_path):
    path = tmp_path / "q.jsonl"
    code, out, _ = cli(capsys, "demo", "queries", "--split", "train", "--num", 3, "--offset", 10, "--out", path)
    assert code == 0 and "indices 10..12" in out
    queries = read_queries(path)
    expected = problems("train", 3, 10)
    assert [q.id for q in queries] == ["demo-train-10", "demo-train-11", "demo-train-12"]
    for q, p in zip(queries, expected):
        assert q.messages == (("user", p.question),) and q.answer == p.answer
        assert is_correct(f"The answer is {q.answer}.", q.answer)
    with pytest.raises(SystemExit):
        main(["demo", "queries", "--split", "heldout", "--num", "3", "--out", str(path)])
    assert "invalid choice: 'heldout'" in capsys.readouterr().err
    code, _, err = cli(capsys, "demo", "queries", "--num", 2, "--offset", 999_999_999, "--out", path)
    assert code == 2 and "held-out seeds" in err


def test_a_judge_that_is_down_stops_with_a_resume_hint(capsys, pair, tmp_path):
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(2))
    code, _, err = cli(capsys, "label", "--small", pair[0], "--large", pair[1], "--queries", queries,
                       "--out", tmp_path / "out", "--verifier", "judge", "--judge-url", "http://127.0.0.1:9/v1",
                       "--judge-model", "m", "--max-tokens", 6, "--continuation-tokens", 2, "--quiet")
    assert code == 1 and "cannot reach the judge" in err and "rerun the same command to resume" in err
    assert (tmp_path / "out" / "work" / "continuations" / "00000.jsonl").is_file()  # kept for the rerun


def test_two_worker_processes_write_what_one_does(capsys, pair, tmp_path):
    from tests.labels.test_pipeline import manifest_without_times, output_files

    queries = write_queries(tmp_path / "q.jsonl", chat_queries(5))
    args = ["label", "--small", pair[0], "--large", pair[1], "--queries", queries, "--verifier", "exact",
            "--max-tokens", 8, "--continuation-tokens", 3, "--top-k", 4, "--shard-size", 1, "--threads", 1, "--quiet"]
    assert cli(capsys, *args, "--out", tmp_path / "one")[0] == 0
    code, out, _ = cli(capsys, *args, "--out", tmp_path / "two", "--workers", 2)
    assert code == 0 and "5 queries" in out
    assert output_files(tmp_path / "two") == output_files(tmp_path / "one")
    assert manifest_without_times(tmp_path / "two") == manifest_without_times(tmp_path / "one")
    timing = json.loads((tmp_path / "two" / "manifest.json").read_text())["timing"]
    assert all(len(t["shards"]) == 5 for t in timing.values())  # both workers' shards
