"""Routed tokens that wait to share a large-model call (`--large-wait-steps`): tokens/s and large-model calls at
one batch size, per policy and wait, beside `large` alone, on the demo pair's problems (greedy).

Each repeat runs every wait setting and then `large` once, in turn, so a busy moment of a shared machine hits
all of them; the first round warms up and is not counted. Outputs must equal the first wait setting's
(`same_tokens`; the run fails otherwise, after writing its figures: waiting must not change a token).

    collab-decode bench wait -- [--device cuda] [--batch 64] [--waits 0 2 4 8] [--policies neural:0.7 entropy:0.3]
Writes wait_bench.json and wait_bench.md to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def timed_generate(engine, prompts: list, sampling, policy: str) -> tuple[float, list]:
    """(output tokens/s, generations) of one batch, the device synchronised at both ends."""
    import torch

    sync = torch.cuda.synchronize if engine.backends["small"].device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    generations = engine.generate(prompts, sampling, policy)
    sync()
    return sum(len(g.token_ids) for g in generations) / (time.perf_counter() - start), generations


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from collab_decode.bench.workload import demo_workload
    from collab_decode.bench.measure import timed_config
    from collab_decode.engine.loading import build_engine
    from collab_decode.pairs import pair_dir, pair_routers

    torch.set_num_threads(args.threads)
    engines = {w: build_engine(str(pair_dir("demo", "small")), str(pair_dir("demo", "large")),
                               routers=pair_routers("demo"), device=args.device,
                               config=timed_config(large_wait_steps=w, large_wait_min_batch=args.min_batch))
               for w in args.waits}
    workload = demo_workload(engines[args.waits[0]].tokenizer, args.batch)
    prompts = [workload.request(i) for i in range(args.batch)]
    rows = []
    for policy in args.policies:
        speeds: dict = {w: [] for w in args.waits} | {"large": []}
        last: dict = {}
        for rep in range(args.repeats + 1):
            for w, engine in engines.items():
                calls_before = engine.runner.num_forwards["large"]
                tps, generations = timed_generate(engine, prompts, workload.sampling(), policy)
                last[w] = (generations, engine.runner.num_forwards["large"] - calls_before)
                speeds[w] += [tps] if rep else []
            tps, _ = timed_generate(engines[args.waits[0]], prompts, workload.sampling(), "large")
            speeds["large"] += [tps] if rep else []
            print(f"{policy}: round {rep + 1}/{args.repeats + 1}{' (warm-up)' if not rep else ''}", flush=True)
        large = statistics.median(speeds["large"])
        reference = [g.token_ids for g in last[args.waits[0]][0]]
        for w in args.waits:
            generations, calls = last[w]
            tokens = sum(len(g.token_ids) for g in generations)
            rows.append({"policy": policy, "wait_steps": w, "batch": args.batch, "device": args.device,
                         "tokens_per_s": round(statistics.median(speeds[w]), 1),
                         "tokens_per_s_repeats": [round(x) for x in speeds[w]],
                         "over_large": round(statistics.median(speeds[w]) / large, 3),
                         "large_tokens_per_s": round(large, 1), "large_calls": calls,
                         "large_share": round(sum(g.stats["large_tokens"] for g in generations) / tokens, 4),
                         "token_waits": sum(g.stats["large_waits"] for g in generations),
                         "same_tokens": [g.token_ids for g in generations] == reference})
            print(f"  wait {w}: {rows[-1]['tokens_per_s']:.0f} tok/s ({rows[-1]['over_large']:.2f}x large's "
                  f"{large:.0f}), {calls} large calls, {rows[-1]['token_waits']} token-steps waited", flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Routed tokens waiting to share a large-model call", "", f"Command: `{command}`", "",
             "| device | batch | policy | wait steps | large share | tok/s (median) | x large | large calls "
             "| token-steps waited | repeats |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['device']} | {r['batch']} | {r['policy']} | {r['wait_steps']} | {r['large_share']:.1%} "
              f"| {r['tokens_per_s']:.0f} | {r['over_large']:.2f}x | {r['large_calls']} | {r['token_waits']} "
              f"| {r['tokens_per_s_repeats']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch", type=int, default=64, help="requests in one batch (demo problems)")
    parser.add_argument("--waits", nargs="+", type=int, default=[0, 2, 4, 8], help="--large-wait-steps settings")
    parser.add_argument("--min-batch", type=int, default=16, help="--large-wait-min-batch")
    parser.add_argument("--policies", nargs="+", default=["neural:0.7", "entropy:0.3"])
    parser.add_argument("--repeats", type=int, default=5, help="counted rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="bench_results/wait")
    args = parser.parse_args(argv)
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "collab-decode bench wait -- " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "wait_bench.json").write_text(json.dumps({"command": command, "runs": rows}, indent=2))
    (out / "wait_bench.md").write_text(markdown(rows, command))
    print(markdown(rows, command))
    differ = [f"{r['policy']} wait {r['wait_steps']}" for r in rows if not r["same_tokens"]]
    if differ:  # after writing: a long run's figures are kept, and the run still fails
        raise SystemExit(f"other tokens than the first wait setting's (waiting must not change one): {differ}")
