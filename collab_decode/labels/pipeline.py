"""The label pipeline: stages 0-4 over shards of the query set, each shard's output written atomically, so a
killed run resumes from its finished shards and ends with the same bytes as an uninterrupted one.

    for stage in steps:                         traces, forcing, continuations, verify, dataset
        for shard k not yet done:               shard k = queries [k * shard_size, (k + 1) * shard_size)
            read the earlier stages' output of shard k -> run the stage -> write its output (temp file + rename)
            record wall and CPU seconds, tokens in manifest.json's timing (the only place times are written)

    OUT/manifest.json            format, pair fingerprint, query file hash, settings, timing, shards, counts
    OUT/stats.json               label counts and fractions (dataset.stats)
    OUT/shards/K.*               the dataset (labels/dataset.py)
    OUT/work/{traces,forcing,continuations,verify}/K.*   stage outputs (may be deleted once the dataset is done)
    OUT/timing/STAGE-K.json      seconds and counts of one shard's stage (gathered into the manifest)

Shards are processed one at a time (their requests batched through the engine), so a shard's computation is
the same whether or not the run was interrupted before it, and whichever process ran it: with several
workers (`worker=(i, n)`), process i takes the shards k with k % n == i through every stage, and whichever
worker finds every shard done writes stats.json and completes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from collab_decode.labels import files
from collab_decode.labels.continuations import Branch, continue_branches, find_branches
from collab_decode.labels.dataset import FORMAT, shard_tables, stats
from collab_decode.labels.forcing import ForcedRows, teacher_force
from collab_decode.labels.progress import Progress
from collab_decode.labels.queries import Query
from collab_decode.labels.settings import STAGES, LabelSettings
from collab_decode.labels.traces import Trace, make_traces
from collab_decode.labels.verifiers import LABELS, AnswerVerifier, ExactVerifier, Verdict, Verifier
from collab_decode.routing.features import LOOKUP_SIZE

STAGE_FILES = {"traces": "work/traces/{}.jsonl", "forcing": "work/forcing/{}.safetensors",
               "continuations": "work/continuations/{}.jsonl", "verify": "work/verify/{}.jsonl",
               "dataset": "shards/{}.safetensors"}  # a stage's shard is done when its file exists
STAGE_ITEMS = {"traces": "traces", "forcing": "traces", "continuations": "branches", "verify": "mismatches",
               "dataset": "shards"}


def make_verifier(tokenizer, settings: LabelSettings, queries: dict[int, Query], judge_api_key: str | None = None
                  ) -> Verifier:
    """The verifier `settings.verifier` names (the judge's client is only imported when it is asked for)."""
    if settings.verifier == "answer":
        return AnswerVerifier(tokenizer, settings, queries)
    if settings.verifier == "exact":
        return ExactVerifier(tokenizer, settings, queries)
    from collab_decode.labels.judge import JudgeVerifier

    return JudgeVerifier(tokenizer, settings, queries, judge_api_key)


class LabelRun:
    def __init__(self, engine, queries: list[Query], settings: LabelSettings, out: str | Path, pair: dict,
                 queries_sha256: str, verifier: Verifier | None = None, progress: bool = True,
                 worker: tuple[int, int] = (0, 1)):
        """`pair`: what the manifest records about the pair (its fingerprint under "fingerprint"). `worker`:
        (i, n) runs only the shards k with k % n == i (n processes share one run)."""
        self.engine = engine
        self.worker = worker
        self.queries = queries
        self.by_index = {q.index: q for q in queries}
        self.settings = settings
        self.out = Path(out)
        self.progress = progress
        self.verifier = verifier or make_verifier(engine.tokenizer, settings, self.by_index)
        self.num_shards = -(-len(queries) // settings.shard_size)
        if worker[1] == 1 and self.out.is_dir():
            files.remove_partial_files(self.out)  # alone: nobody else is writing here
        self.manifest = self._open_manifest(pair, queries_sha256)

    # ---- the run ------------------------------------------------------------------------------------------
    def run(self, steps: list[str] = STAGES) -> dict:
        """Run the named stages over every unfinished shard; returns the manifest."""
        for stage in STAGES:
            if stage in steps:
                self.run_stage(stage)
        return self.manifest

    def run_stage(self, stage: str) -> None:
        i, n = self.worker
        todo = [k for k in range(self.num_shards) if k % n == i and not self.done(stage, k)]
        progress = Progress(stage, len(todo), STAGE_ITEMS[stage], self.progress)
        work = getattr(self, f"_{stage}")
        for k in todo:
            self._check_inputs(stage, k)
            t0, cpu0 = time.perf_counter(), time.process_time()
            counts = work(k, progress)
            self._check_blocks_free(stage)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0  # CPU: less on a busy machine
            record = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), **counts}
            files.write_json(self._timing_path(stage, k), record)
            self._write_manifest()
        progress.close()
        if stage == "dataset" and self.complete():
            self.finish()

    def complete(self) -> bool:
        """Every shard of the dataset is written (by any worker)."""
        return all(self.done("dataset", k) for k in range(self.num_shards))

    def done(self, stage: str, k: int) -> bool:
        return self.path(stage, k).is_file()

    def path(self, stage: str, k: int) -> Path:
        return self.out / STAGE_FILES[stage].format(files.shard_name(k))

    def shard_queries(self, k: int) -> list[Query]:
        size = self.settings.shard_size
        return self.queries[k * size:(k + 1) * size]

    # ---- stages (one shard each; they return counts for the timing record) -------------------------------
    def _traces(self, k: int, progress: Progress) -> dict:
        queries = self.shard_queries(k)
        progress.start_shard(len(queries))
        traces = make_traces(self.engine, queries, self.settings.max_tokens, progress)
        files.write_jsonl(self.path("traces", k), traces)
        return {"items": len(traces), "tokens": sum(len(t.response_ids) for t in traces if t.finish_reason != "given"),
                "prompt_tokens": sum(len(t.prompt_ids) for t in traces)}

    def _forcing(self, k: int, progress: Progress) -> dict:
        traces = self.traces(k)
        progress.start_shard(len(traces))
        rows = teacher_force(self.engine, traces, self.settings.top_k, self.settings.forced_tokens, progress)
        tensors = rows.columns()
        tensors["features"] = tensors["features"].to("cpu").half()  # the dataset's precision
        files.write_tensors(self.path("forcing", k), tensors)
        return {"items": len(traces), "tokens": sum(len(t.prompt_ids) + len(t.response_ids) - 1 for t in traces),
                "positions": len(rows.token_id)}

    def _continuations(self, k: int, progress: Progress) -> dict:
        traces = {t.query_index: t for t in self.traces(k)}
        branches = find_branches(self.forced(k))
        progress.start_shard(len(branches))
        continue_branches(self.engine, traces, branches, self.verifier, progress)
        files.write_jsonl(self.path("continuations", k), branches)
        continued = [b for b in branches if b.continuation_ids]
        return {"items": len(branches), "tokens": sum(len(b.continuation_ids) for b in continued),
                "prompt_tokens": sum(len(traces[b.query_index].prompt_ids) + b.position + 1 for b in continued)}

    def _verify(self, k: int, progress: Progress) -> dict:
        traces = {t.query_index: t for t in self.traces(k)}
        branches = self.branches(k)
        progress.start_shard(len(branches))
        verdicts = self.verifier.label([(b, traces[b.query_index]) for b in branches])
        progress.add(num_items=len(branches))
        files.write_jsonl(self.path("verify", k), verdicts)
        return {"items": len(branches)}

    def _dataset(self, k: int, progress: Progress) -> dict:
        progress.start_shard(1)
        tensors, query_records, mismatch_records = shard_tables(
            self.forced(k), self.traces(k), self.by_index, self.branches(k),
            files.read_jsonl(self.path("verify", k), Verdict))
        name = files.shard_name(k)
        files.write_jsonl(self.out / "shards" / f"{name}.queries.jsonl", query_records)
        files.write_jsonl(self.out / "shards" / f"{name}.mismatches.jsonl", mismatch_records)
        files.write_tensors(self.path("dataset", k), tensors)  # last: its existence marks the shard done
        progress.add(num_items=1)
        return {"items": 1, "rows": len(tensors["label"])}

    # ---- reading stage outputs ---------------------------------------------------------------------------
    def traces(self, k: int) -> list[Trace]:
        return files.read_jsonl(self.path("traces", k), Trace)

    def forced(self, k: int) -> ForcedRows:
        return ForcedRows.from_columns(files.read_tensors(self.path("forcing", k)))

    def branches(self, k: int) -> list[Branch]:
        return files.read_jsonl(self.path("continuations", k), Branch)

    # ---- bookkeeping -------------------------------------------------------------------------------------
    def _check_inputs(self, stage: str, k: int) -> None:
        i = STAGES.index(stage)
        missing = [s for s in STAGES[:i] if not self.done(s, k)]
        if missing:
            raise ValueError(f"stage {stage} of shard {k} needs the output of stage {missing[0]} "
                             f"({self.path(missing[0], k)}): run --steps {missing[0]} first (or --steps all)")

    def _check_blocks_free(self, stage: str) -> None:
        for name, kv in self.engine.kv.items():
            if kv.num_used_blocks:
                raise RuntimeError(f"after stage {stage}, {kv.num_used_blocks} {name}-model KV blocks are still held")

    def _open_manifest(self, pair: dict, queries_sha256: str) -> dict:
        path = self.out / "manifest.json"
        fresh = {"format": FORMAT, "pair": pair,
                 "queries": {"sha256": queries_sha256, "num_queries": len(self.queries)},
                 "settings": self.settings.as_dict(), "features": self._feature_layout(),
                 "labels": list(LABELS),  # the dataset's label codes, in order
                 "num_shards": self.num_shards, "timing": {}, "complete": False}
        if not path.is_file():
            self.out.mkdir(parents=True, exist_ok=True)
            files.write_json(path, fresh)
            return fresh
        old = json.loads(path.read_text())
        _check_same_run(old, fresh, self.settings, path)
        old["settings"] = fresh["settings"]  # settings outside the output (e.g. judge concurrency) may change
        for stage, timing in old.get("timing", {}).items():  # times a manifest holds but timing/ lacks
            for name, record in timing.get("shards", {}).items():
                if not self._timing_path(stage, int(name)).is_file():
                    files.write_json(self._timing_path(stage, int(name)), record)
        return old

    def _feature_layout(self) -> dict:
        h, k = self.engine.backends["small"].hidden_size, self.settings.top_k
        return {"dtype": "float16", "size": 2 * h + k, "hidden_size": h, "top_k": k,
                "layout": {"hidden": [0, h], "token_embedding": [h, 2 * h], "top_k_logits": [2 * h, 2 * h + k]},
                "lookup_size": LOOKUP_SIZE}  # the `lookup` tensor: routing/features.py lookup_features

    def _timing_path(self, stage: str, k: int) -> Path:
        return self.out / "timing" / f"{stage}-{files.shard_name(k)}.json"

    def _write_manifest(self) -> None:
        """The manifest with the timing of every shard recorded so far (by any worker)."""
        timing = {}
        for stage in STAGES:
            paths = [(files.shard_name(k), self._timing_path(stage, k)) for k in range(self.num_shards)]
            shards = {name: json.loads(p.read_text()) for name, p in paths if p.is_file()}
            if shards:
                timing[stage] = _totals(shards)
        self.manifest["timing"] = timing
        files.write_json(self.out / "manifest.json", self.manifest)

    def finish(self) -> dict:
        """stats.json and the completed manifest, from every shard; returns the manifest."""
        labels, queries = [], []
        for k in range(self.num_shards):
            labels.append(files.read_tensors(self.path("dataset", k))["label"])
            queries += files.read_jsonl(self.out / "shards" / f"{files.shard_name(k)}.queries.jsonl")
        summary = stats(labels, queries)
        files.write_json(self.out / "stats.json", summary)
        self.manifest.update(shards=[files.shard_name(k) for k in range(self.num_shards)], counts=summary["counts"],
                             num_positions=summary["num_positions"], complete=True)
        self._write_manifest()
        return self.manifest


def _totals(shards: dict[str, dict]) -> dict:
    """A stage's timing: its shards' records and their sums (seconds summed over shards: with several
    workers, more than the wall time)."""
    total = {"shards": shards}
    for key in ("seconds", "cpu_seconds", "items", "tokens", "prompt_tokens", "positions", "rows"):
        if any(key in r for r in shards.values()):
            total[key] = round(sum(r.get(key, 0) for r in shards.values()), 3)
    if total.get("tokens"):
        total["tokens_per_s"] = round(total["tokens"] / max(total["seconds"], 1e-9), 1)
    return total


def _check_same_run(old: dict, fresh: dict, settings: LabelSettings, path: Path) -> None:
    """A rerun into the same directory must be the same run: same pair, query file and output settings."""
    problems = []
    if old.get("format") != fresh["format"]:
        problems.append(f"format {old.get('format')!r} (this version writes {fresh['format']!r})")
    if old.get("pair", {}).get("fingerprint") != fresh["pair"]["fingerprint"]:
        problems.append("the pair (its fingerprint differs)")
    if old.get("queries", {}).get("sha256") != fresh["queries"]["sha256"]:
        problems.append("the query file (its content differs)")
    if "lookup_size" not in old.get("features", {}):
        problems.append("its rows' features (written before the prompt lookup columns; to redo only teacher forcing "
                        "and the dataset, copy its work/traces, work/continuations and work/verify to a new --out)")
    old_settings = old.get("settings", {})
    for key, value in settings.output_dict().items():
        if old_settings.get(key) != value:
            problems.append(f"setting {key} (was {old_settings.get(key)!r}, now {value!r})")
    if problems:
        raise ValueError(f"{path.parent} holds another labelling run; it differs in " + "; ".join(problems)
                         + ". Use another --out, or delete that directory to start over")


def file_sha256(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
