"""Stage 4, the dataset: per shard, the teacher-forcing rows joined with the verdicts, plus the reader the router
trainer uses.

    work/forcing/K.safetensors + work/continuations/K.jsonl + work/verify/K.jsonl + traces
      -> shards/K.safetensors     one row per response position (tensors below)
         shards/K.queries.jsonl   one line per query: its id and its rows [first_row, first_row + num_rows)
         shards/K.mismatches.jsonl one line per mismatch: tokens, label, how the verifier decided
    all shards -> stats.json (counts and fractions of each label)

Tensors of a shard (N rows, row = a response position, queries in file order, positions in order):
    features     (N, 2H + top_k) float16  router_features: [hidden, embedding of small_top1, top-k logits]
    lookup       (N, LOOKUP_SIZE) float32  lookup_features: the prompt lookup (train-router --prompt-lookup)
    label        (N,) uint8   index into LABELS: identical, neutral, divergent, unparsed, skipped
    query_index  (N,) int32   the query's index in the query file (split by it, never by row)
    position     (N,) int32   index in the response
    token_id     (N,) int32   the reference trace's token
    small_top1   (N,) int32   the small model's greedy proposal (token_id != small_top1: a mismatch)
    entropy, top1_prob, top2_margin (N,) float32  single-signal baselines from the small model's logits
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from collab_decode.labels.continuations import Branch
from collab_decode.labels.files import read_tensors
from collab_decode.labels.forcing import ForcedRows
from collab_decode.labels.queries import Query
from collab_decode.labels.traces import Trace
from collab_decode.labels.verifiers import LABELS, Verdict

FORMAT = "collab-decode-labels/1"


def shard_tables(rows: ForcedRows, traces: list[Trace], queries: dict[int, Query], branches: list[Branch],
                 verdicts: list[Verdict]) -> tuple[dict[str, torch.Tensor], list[dict], list[dict]]:
    """The three parts of a dataset shard: tensors, query records, mismatch records."""
    mismatch_rows = rows.mismatch.nonzero().flatten()
    if len(mismatch_rows) != len(branches) or len(branches) != len(verdicts):
        raise ValueError(f"stage outputs disagree: {len(mismatch_rows)} mismatches, {len(branches)} branches, "
                         f"{len(verdicts)} verdicts (delete the shard's work files and rerun its stages)")
    label = torch.zeros(len(rows.token_id), dtype=torch.uint8)
    label[mismatch_rows] = torch.tensor([LABELS.index(v.label) for v in verdicts], dtype=torch.uint8)
    tensors = {**rows.columns(), "features": rows.features.to(torch.float16), "label": label}
    query_records, first_row = [], 0
    for trace in traces:
        n = len(trace.response_ids)
        query_records.append({"query_index": trace.query_index, "id": queries[trace.query_index].id,
                              "first_row": first_row, "num_rows": n, "num_prompt_tokens": len(trace.prompt_ids),
                              "finish_reason": trace.finish_reason})
        first_row += n
    mismatch_records = [{"query_index": b.query_index, "position": b.position, "reference_token": b.reference_token,
                         "small_token": b.small_token, "label": v.label, "finish_reason": b.finish_reason,
                         "num_continuation_tokens": len(b.continuation_ids), "detail": v.detail}
                        for b, v in zip(branches, verdicts)]
    return tensors, query_records, mismatch_records


def stats(labels: list[torch.Tensor], query_records: list[dict]) -> dict:
    """Counts and fractions of each label over every position, and over mismatches."""
    counts = Counter()
    for label in labels:
        counts.update(dict(zip(LABELS, torch.bincount(label.long(), minlength=len(LABELS)).tolist())))
    num_positions = sum(counts.values())
    num_mismatches = num_positions - counts["identical"]
    return {
        "num_queries": len(query_records),
        "num_positions": num_positions,
        "num_mismatches": num_mismatches,
        "mismatch_rate": _ratio(num_mismatches, num_positions),
        "counts": {name: counts[name] for name in LABELS},
        "fraction_of_positions": {name: _ratio(counts[name], num_positions) for name in LABELS},
        "fraction_of_mismatches": {name: _ratio(counts[name], num_mismatches) for name in LABELS[1:]},
        "trace_finish_reasons": dict(sorted(Counter(q["finish_reason"] for q in query_records).items())),
    }


def _ratio(a: int, b: int) -> float:
    return round(a / b, 6) if b else 0.0


# ---- reading --------------------------------------------------------------------------------------------
@dataclass
class LabelDataset:
    """A whole dataset in memory: the shards' tensors concatenated (row order kept) and the query records."""

    manifest: dict
    tensors: dict[str, torch.Tensor]  # name -> (N, ...) as in a shard
    queries: list[dict]  # one record per query, first_row counted over the whole dataset

    @property
    def num_rows(self) -> int:
        return len(self.tensors["label"])

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) float 1 = divergent, 0 = identical or neutral; and the (N,) bool mask of rows that have a target
        (unparsed and skipped rows have none)."""
        label = self.tensors["label"].long()
        divergent, neutral, identical = (LABELS.index(n) for n in ("divergent", "neutral", "identical"))
        usable = (label == divergent) | (label == neutral) | (label == identical)
        return (label == divergent).float(), usable

    def split_by_query(self, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool masks (train, validation) over rows; every query's rows fall on one side (a seeded shuffle)."""
        indices = sorted({q["query_index"] for q in self.queries})
        random.Random(seed).shuffle(indices)
        num_val = max(1, round(val_fraction * len(indices))) if val_fraction > 0 else 0
        val = torch.isin(self.tensors["query_index"], torch.tensor(indices[:num_val], dtype=torch.int32))
        return ~val, val


def read_dataset(path: str | Path) -> LabelDataset:
    """Every shard of a finished labelling run, in order. ValueError if the run is not finished."""
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise ValueError(f"{path} is not a label dataset (no manifest.json)")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown dataset format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not manifest.get("complete"):
        raise ValueError(f"{path}: the labelling run has not finished (rerun `collab-decode label` to resume)")
    parts, queries, offset = [], [], 0
    for shard in manifest["shards"]:
        parts.append(read_tensors(path / "shards" / f"{shard}.safetensors"))
        with (path / "shards" / f"{shard}.queries.jsonl").open() as f:
            for line in f:
                record = json.loads(line)
                record["first_row"] += offset
                queries.append(record)
        offset += len(parts[-1]["label"])
    tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]} if parts else {}
    return LabelDataset(manifest, tensors, queries)
