"""`collab-decode label`: routing labels for a pair, from a query file to a sharded dataset.

    collab-decode label --pair demo --queries train.jsonl --out data/labels/demo [--verifier answer]
    collab-decode label --small DIR --large DIR --queries q.jsonl --out OUT --verifier judge \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model demo

The settings flags derive from LabelSettings (labels/settings.py); the model flags build the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from collab_decode.labels.settings import STAGES, LabelSettings

DESCRIPTION = """Routing labels for a small/large pair (DESIGN.md, "Labels"), in five resumable stages:
  0 traces         the large model answers each query greedily (or the query file gives "response")
  1 forcing        the small model teacher-forces each trace: router features at every response position;
                   a position where its top-1 differs from the trace is a mismatch
  2 continuations  from each mismatch, prefix + the small model's token, continued greedily by the large model
  3 verify         each mismatch labelled neutral or divergent (--verifier answer | judge | exact)
  4 dataset        shards of features (float16 safetensors) + per-position labels, a manifest and stats.json
Queries: JSONL, one {"id", "prompt" | "messages", "answer"?, "response"?} per line. Rerun the same command
to resume: finished shards are skipped, and the result equals an uninterrupted run byte for byte."""


def add_label_parser(subparsers) -> None:
    p = subparsers.add_parser("label", help="routing labels for a pair: traces, mismatches, verdicts, dataset",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--queries", required=True, help="the query set (JSONL)")
    io.add_argument("--out", required=True, help="output directory (created; rerun into it to resume)")
    io.add_argument("--steps", default="all", help="stages to run: all, numbers/ranges (0-2, 3,4) or names "
                    f"({', '.join(STAGES)}); a stage needs the earlier stages' output (default: all)")
    io.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    models = p.add_argument_group("models")
    models.add_argument("--pair", help="a shipped pair by name: demo")
    models.add_argument("--small", help="small model directory (Hugging Face format)")
    models.add_argument("--large", help="large model directory (same tokenizer as the small one)")
    models.add_argument("--backend", default="native", choices=["native", "transformers"])
    models.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    models.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    models.add_argument("--kv-memory", type=int, default=512, help="KV-cache memory per model, MiB (default: 512)")
    models.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (default: torch's choice; 1 is fastest on a busy machine)")
    models.add_argument("--workers", type=int, default=1,
                        help="processes sharing the run, each with its own engine, taking every Nth shard "
                             "(e.g. --workers 2 --threads 1 on two cores; the output is the same) (default: 1)")
    settings = p.add_argument_group("labelling")
    for f in dataclasses.fields(LabelSettings):
        default = "" if f.default is None else f" (default: {f.default!r})"
        kwargs = {"default": f.default, "type": f.metadata.get("type", type(f.default)),
                  "help": f.metadata["help"] + default}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        settings.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    settings.add_argument("--judge-api-key", default=os.environ.get("COLLAB_DECODE_JUDGE_API_KEY"),
                          help="judge: bearer token (default: $COLLAB_DECODE_JUDGE_API_KEY; never written out)")
    p.set_defaults(func=cmd_label)


def cmd_label(args: argparse.Namespace) -> int:
    """Run the asked stages (this process is worker 0 of --workers); print the timing and the label summary."""
    from collab_decode.labels.files import remove_partial_files
    from collab_decode.labels.judge import JudgeError

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and Path(args.out).is_dir():
        remove_partial_files(Path(args.out))  # before any worker starts writing
    run, steps = _label_run(args, worker=0)  # also creates the manifest before other workers start
    children = _start_workers(args)
    try:
        manifest = run.run(steps)
        for p in children:
            p.join()
        failed = [p.exitcode for p in children if p.exitcode]
        if failed:
            raise ValueError(f"{len(failed)} worker process(es) failed (exit codes {failed}); rerun to resume")
        if run.complete():
            manifest = run.finish()  # whichever worker ended last did; again, with every worker's times
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume from the finished shards in {args.out}",
              file=sys.stderr)
        return 130
    except JudgeError as e:
        print(f"\nerror: {e}\nrerun the same command to resume from the finished shards in {args.out}",
              file=sys.stderr)
        return 1
    finally:
        for p in children:
            p.join()
    _print_summary(Path(args.out), manifest)
    return 0


def _label_run(args: argparse.Namespace, worker: int):
    """The LabelRun of one worker process, and the stages to run."""
    import torch

    from collab_decode.engine.loading import resolve_pair
    from collab_decode.labels.pipeline import LabelRun, file_sha256, make_verifier
    from collab_decode.labels.queries import read_queries
    from collab_decode.labels.settings import parse_steps

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = LabelSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LabelSettings)})
    steps = parse_steps(args.steps)
    queries = read_queries(args.queries)  # a bad file fails before any model loads
    small, large = resolve_pair(args.pair, args.small, args.large)
    if small is None or large is None:
        raise ValueError("label needs a pair: --pair demo, or --small DIR and --large DIR")
    engine = _engine(args, small, large, settings)
    verifier = make_verifier(engine.tokenizer, settings, {q.index: q for q in queries}, args.judge_api_key)
    run = LabelRun(engine, queries, settings, args.out, _pair_record(engine, small, large), file_sha256(args.queries),
                   verifier, progress=not args.quiet and worker == 0, worker=(worker, args.workers))
    return run, steps


def _start_workers(args: argparse.Namespace) -> list:
    """Workers 1..N-1 as fresh processes (spawned: no torch state is inherited)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_worker_main, args=(args, i), name=f"label-worker-{i}")
                for i in range(1, args.workers)]
    for p in children:
        p.start()
    return children


def _worker_main(args: argparse.Namespace, worker: int) -> None:
    run, steps = _label_run(args, worker)
    run.run(steps)


def _engine(args, small: str, large: str, settings: LabelSettings):
    from collab_decode.engine.config import MIB, EngineConfig
    from collab_decode.engine.loading import build_engine
    from collab_decode.engine.scheduler import SchedulerConfig

    if args.kv_memory < 1:
        raise ValueError(f"--kv-memory must be >= 1 MiB, got {args.kv_memory}")
    config = EngineConfig(small_kv_bytes=args.kv_memory * MIB, large_kv_bytes=args.kv_memory * MIB,
                          scheduler=SchedulerConfig(max_num_seqs=settings.batch_size))
    return build_engine(small, large, args.backend, args.dtype, args.device, config)


def _pair_record(engine, small: str, large: str) -> dict:
    return {"fingerprint": engine.fingerprint, "small": str(small), "large": str(large),
            "vocab_size": engine.vocab_size}


def _print_summary(out: Path, manifest: dict) -> None:
    from collab_decode.labels.pipeline import STAGE_ITEMS

    for stage, t in manifest["timing"].items():
        rate = f", {t['tokens']:,} tokens, {t['tokens_per_s']:,.0f} tokens/s" if t.get("tokens_per_s") else ""
        print(f"{stage:>13}: {t['seconds']:8.1f} s, {t.get('items', 0)} {STAGE_ITEMS[stage]}{rate}")
    if not manifest.get("complete"):
        print(f"not finished: rerun with --steps all to complete {out}")
        return
    summary = json.loads((out / "stats.json").read_text())
    print(f"{summary['num_queries']} queries, {summary['num_positions']} positions, "
          f"{summary['num_mismatches']} mismatches ({summary['mismatch_rate']:.2%})")
    for name, fraction in summary["fraction_of_positions"].items():
        print(f"  {name:>9}: {summary['counts'][name]:7d}  {fraction:.2%} of positions")
    print(f"dataset: {out}/shards (manifest.json, stats.json)", file=sys.stderr)
