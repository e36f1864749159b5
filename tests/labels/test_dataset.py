"""The dataset as the router trainer reads it: rows line up with queries and mismatches, targets, and a
validation split by query."""

from __future__ import annotations

import torch

from collab_decode.labels.dataset import read_dataset
from collab_decode.labels.files import read_jsonl
from collab_decode.labels.verifiers import LABELS
from tests.labels.conftest import chat_queries, label_run, write_queries


def test_rows_queries_and_mismatches_line_up(tmp_path, engine):
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(5))
    label_run(engine, queries, tmp_path / "out", verifier="exact").run()
    data = read_dataset(tmp_path / "out")
    t = data.tensors
    assert set(t) == {"features", "lookup", "label", "query_index", "position", "token_id", "small_top1", "entropy",
                      "top1_prob", "top2_margin"}
    assert t["lookup"].shape == (len(t["label"]), data.manifest["features"]["lookup_size"])
    assert t["features"].dtype == torch.float16 and t["label"].dtype == torch.uint8
    assert data.manifest["labels"] == list(LABELS) and data.manifest["features"]["size"] == t["features"].shape[1]
    assert [q["id"] for q in data.queries] == [f"q{i}" for i in range(5)]
    for q in data.queries:  # each query's rows: its index, positions 0..n-1
        rows = slice(q["first_row"], q["first_row"] + q["num_rows"])
        assert (t["query_index"][rows] == q["query_index"]).all()
        assert t["position"][rows].tolist() == list(range(q["num_rows"]))
    identical = t["label"] == LABELS.index("identical")
    assert torch.equal(identical, t["token_id"] == t["small_top1"])  # mismatches are exactly the labelled rows
    mismatches = [m for k in ("00000", "00001", "00002")
                  for m in read_jsonl(tmp_path / "out" / "shards" / f"{k}.mismatches.jsonl")]
    rows = (~identical).nonzero().flatten().tolist()
    assert [(m["query_index"], m["position"], LABELS.index(m["label"])) for m in mismatches] == [
        (int(t["query_index"][i]), int(t["position"][i]), int(t["label"][i])) for i in rows]


def test_targets_and_split_by_query(tmp_path, engine):
    queries = write_queries(tmp_path / "q.jsonl", chat_queries(5))
    label_run(engine, queries, tmp_path / "out", verifier="exact").run()
    data = read_dataset(tmp_path / "out")
    target, usable = data.targets()
    label = data.tensors["label"]
    assert torch.equal(target.bool(), label == LABELS.index("divergent"))
    assert torch.equal(usable, label <= LABELS.index("divergent"))
    train, val = data.split_by_query(0.4, seed=0)
    assert torch.equal(train, ~val) and val.any() and train.any()
    val_queries = set(data.tensors["query_index"][val].tolist())
    assert len(val_queries) == 2 and not val_queries & set(data.tensors["query_index"][train].tolist())
    assert torch.equal(data.split_by_query(0.4, seed=0)[1], val)  # seeded
