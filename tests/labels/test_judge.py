"""The judge verifier: its reply parser on hand-made replies (malformed ones included), its prompt, and the
whole judge stage against a running collab-decode server (OpenAI-compatible chat completions)."""

from __future__ import annotations

import pytest

from collab_decode.labels.files import read_jsonl, shard_name
from collab_decode.labels.judge import (DEFAULT_TEMPLATE, JudgeClient, JudgeError, judge_prompt, load_template,
                                        parse_judge_reply)
from collab_decode.labels.verifiers import LABELS
from collab_decode.serve.server import ServeConfig
from tests.labels.conftest import assert_blocks_free, chat_queries, label_run, write_queries
from tests.serve.conftest import running_server


@pytest.mark.parametrize("reply, label", [
    ("SAME", "neutral"),
    ("same", "neutral"),
    (" Same.", "neutral"),
    ("**DIFFERENT**", "divergent"),
    ("Different: B changes the number.", "divergent"),
    ("NEUTRAL", "neutral"),
    ("Divergent", "divergent"),
    ("Equivalent wording.", "neutral"),
    ("Let me compare.\nVerdict: DIFFERENT", "divergent"),
    ("Verdict: same\n...on reflection, Verdict: different", "divergent"),  # the last verdict counts
    ("<think>They look the same... or different?</think>\nSAME", "neutral"),
    ("verdict = Same", "neutral"),
])
def test_parse_judge_reply(reply, label):
    assert parse_judge_reply(reply) == label


@pytest.mark.parametrize("reply", [
    "", "   ", "I cannot tell.", "The two continuations are the same.",  # not a one-word verdict
    "Verdict: maybe", "42", "<think>unfinished thought, SAME", "Verdict:", None, 17, ["SAME"],
    "Ann has 352 marbles.", "\u00e9t\u00e9",
])
def test_unparseable_replies_are_unparsed(reply):
    assert parse_judge_reply(reply) == "unparsed"


def test_prompt_template(tmp_path):
    prompt = judge_prompt(DEFAULT_TEMPLATE, "CTX {x}", "REF", "CAND")
    assert "CTX {x}" in prompt and "REF" in prompt and "CAND" in prompt and "{reference}" not in prompt
    custom = tmp_path / "t.txt"
    custom.write_text("A={reference} B={candidate} {literal braces}")
    assert judge_prompt(load_template(str(custom)), "c", "r", "d") == "A=r B=d {literal braces}"
    assert load_template(None) == DEFAULT_TEMPLATE
    bad = tmp_path / "bad.txt"
    bad.write_text("only {reference}")
    with pytest.raises(ValueError, match="lacks \\{candidate\\}"):
        load_template(str(bad))
    with pytest.raises(ValueError, match="cannot read the judge template"):
        load_template(str(tmp_path / "missing.txt"))


def test_a_server_that_is_down_stops_the_stage():
    client = JudgeClient("http://127.0.0.1:9/v1", "m", max_tokens=4, concurrency=1)
    with pytest.raises(JudgeError, match="cannot reach the judge"):
        client.ask("hello")


def test_judge_stage_against_a_running_collab_decode_server(tmp_path, engine):
    template = tmp_path / "template.txt"
    template.write_text("Same or different?\nA: {reference}\nB: {candidate}\nVerdict:")
    too_long = tmp_path / "too_long.txt"
    too_long.write_text("{context} " * 40 + "{reference} {candidate}")  # past the demo pair's context
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(2))
    with running_server(ServeConfig(port=0, grpc_port=0, log_level="warning")) as server:
        url = f"{server.url}/v1"
        for name, path in (("ok", template), ("long", too_long)):
            run = label_run(engine, queries, tmp_path / name, verifier="judge", judge_url=url, judge_model="demo",
                            judge_template=str(path), judge_max_tokens=4, judge_concurrency=3)
            run.run()
            assert_blocks_free(engine)
            branches = [b for k in range(run.num_shards) for b in run.branches(k)]
            records = [r for k in range(run.num_shards)
                       for r in read_jsonl(run.out / "shards" / f"{shard_name(k)}.mismatches.jsonl")]
            assert len(records) == len(branches) > 0
            for record in records:
                assert record["label"] in ("neutral", "divergent", "unparsed")
                if name == "ok":  # the server answered every one, and the label is what its reply says
                    assert isinstance(record["detail"]["reply"], str)
                    assert record["label"] == parse_judge_reply(record["detail"]["reply"])
                else:  # refused as too long: unparsed, with the server's reason
                    assert record["label"] == "unparsed" and "HTTP 400" in record["detail"]["error"]
            assert sum(run.manifest["counts"][label] for label in LABELS[1:]) == len(records)
