"""The pipeline over shards: all stages end to end, every block free after each stage, and a run killed
anywhere and resumed writes the same bytes as one that was never interrupted."""

from __future__ import annotations

import json

import pytest

import collab_decode.labels.pipeline as pipeline
from collab_decode.labels.dataset import read_dataset
from collab_decode.labels.settings import parse_steps
from tests.labels.conftest import assert_blocks_free, chat_queries, label_run, pair_engine, write_queries

CHECKER = "tests.labels.checkers:even_length"  # a deterministic mix of neutral and divergent on random models


def output_files(out):
    """Every file a run wrote, except the times: the manifest (its timing section) and timing/."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and p.parent.name != "timing"}


def manifest_without_times(out):
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("timing")
    return manifest


def test_every_stage_end_to_end(tmp_path, pair):
    engine = pair_engine(pair)
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(5, answers=True))
    run = label_run(engine, queries, tmp_path / "out", answer_checker=CHECKER)
    for stage in parse_steps("all"):
        run.run_stage(stage)
        assert_blocks_free(engine)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards"] == ["00000", "00001", "00002"]
    assert set(manifest["timing"]) == set(parse_steps("all"))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["num_queries"] == 5 and stats["num_positions"] == manifest["num_positions"]
    assert stats["counts"]["neutral"] > 0 and stats["counts"]["divergent"] > 0
    assert stats["num_mismatches"] == sum(stats["counts"][k] for k in ("neutral", "divergent", "unparsed", "skipped"))
    data = read_dataset(tmp_path / "out")
    assert data.num_rows == stats["num_positions"] and data.tensors["features"].shape[1] == 2 * 32 + 8


def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path, pair, monkeypatch):
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(5, answers=True))
    label_run(pair_engine(pair), queries, tmp_path / "whole", answer_checker=CHECKER).run()
    expected = output_files(tmp_path / "whole")

    out = tmp_path / "resumed"
    for stage in parse_steps("all"):  # killed in the second shard of each stage in turn
        real = getattr(pipeline.LabelRun, f"_{stage}")

        def killed(self, k, progress, real=real):
            if k == 1:
                (self.path(stage, k).parent / f".{k}.safetensors.123.tmp").write_text("half a file")
                raise KeyboardInterrupt
            return real(self, k, progress)

        monkeypatch.setattr(pipeline.LabelRun, f"_{stage}", killed)
        with pytest.raises(KeyboardInterrupt):
            label_run(pair_engine(pair), queries, out, answer_checker=CHECKER).run()
        monkeypatch.undo()
    label_run(pair_engine(pair), queries, out, answer_checker=CHECKER).run()
    assert output_files(out) == expected  # the half-written files are gone too
    assert manifest_without_times(out) == manifest_without_times(tmp_path / "whole")
    timing = json.loads((out / "manifest.json").read_text())["timing"]
    assert all(len(t["shards"]) == 3 for t in timing.values())  # each shard's time, from whichever run did it


def test_a_rerun_skips_finished_shards(tmp_path, engine, monkeypatch):
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(3))
    label_run(engine, queries, tmp_path / "out", verifier="exact").run()
    monkeypatch.setattr(pipeline, "make_traces", lambda *a, **k: pytest.fail("a finished shard ran again"))
    label_run(engine, queries, tmp_path / "out", verifier="exact").run()


def test_a_different_run_into_the_same_directory_is_refused(tmp_path, engine):
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(2))
    label_run(engine, queries, tmp_path / "out", verifier="exact").run(["traces"])
    with pytest.raises(ValueError, match="setting top_k \\(was 8, now 4\\)"):
        label_run(engine, queries, tmp_path / "out", verifier="exact", top_k=4)
    other = write_queries(tmp_path / "other.jsonl", chat_queries(3))
    with pytest.raises(ValueError, match="the query file"):
        label_run(engine, other, tmp_path / "out", verifier="exact")
    label_run(engine, queries, tmp_path / "out", verifier="exact", judge_concurrency=3)  # not in the output
    # a run from before the prompt lookup columns: its rows lack them, and the message says what to keep
    manifest = tmp_path / "out" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["features"]["lookup_size"]
    manifest.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="before the prompt lookup columns.*work/continuations"):
        label_run(engine, queries, tmp_path / "out", verifier="exact")


def test_a_stage_needs_the_earlier_stages(tmp_path, engine):
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(2))
    run = label_run(engine, queries, tmp_path / "out", verifier="exact")
    with pytest.raises(ValueError, match="needs the output of stage traces.*--steps traces"):
        run.run(["continuations"])
    run.run(parse_steps("0-1"))
    assert not (tmp_path / "out" / "stats.json").exists()
    with pytest.raises(ValueError, match="has not finished"):
        read_dataset(tmp_path / "out")
    run.run(parse_steps("continuations,3,4"))
    assert read_dataset(tmp_path / "out").num_rows > 0


def test_parse_steps():
    assert parse_steps("all") == ["traces", "forcing", "continuations", "verify", "dataset"]
    assert parse_steps("0-2") == ["traces", "forcing", "continuations"]
    assert parse_steps("4,verify, 0") == ["traces", "verify", "dataset"]
    for bad in ("5", "2-1", "x", "0-9", ""):
        with pytest.raises(ValueError, match="bad step"):
            parse_steps(bad)


def test_settings_are_checked_and_escapes_read():
    from collab_decode.labels.settings import LabelSettings, unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\\n") == "a\\n" and unescape("é") == "é"
    for bad, message in ((dict(verifier="vote"), "verifier must be one of"), (dict(top_k=0), "top_k must be"),
                         (dict(shard_size=True), "shard_size must be"), (dict(step_delimiter=""), "step_delimiter"),
                         (dict(verifier="judge", judge_url="http://x"), "needs judge_url and judge_model")):
        with pytest.raises(ValueError, match=message):
            LabelSettings(**bad)
