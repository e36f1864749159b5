"""Demo-pair decode speed of two revisions, side by side: A B A B ... in one run on one machine.

    .venv/bin/python tools/speed_compare.py BEFORE_REV AFTER_REV [--rounds 3] [--policies large entropy:0.3]
    .venv/bin/python tools/speed_compare.py BEFORE_REV AFTER_REV --server [--levels 16 64] [--policies ...]

With --server: `serve` of each revision (both started once, on the demo pair with its router, as `bench run`
starts it), driven in turn over REST by this checkout's load generator at each concurrency (3 x concurrency
requests, streamed): tokens/s and TTFT p50 / p95 per round, and the medians' after / before ratios.

Each revision is checked out into a temporary worktree (its C modules built there); each measurement is a
fresh process (so one revision's warm caches never help the other) that loads the demo pair, warms up, and times greedy
generation of held-out demo problems at batch 1 (requests one after another) and batch 64 (all at
once). Prints tokens/s per (revision, policy, batch) for every round and the after/before ratio of the
medians. Works on any revision whose Engine.generate(prompts, SamplingParams, policy) exists.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r'''
import json, sys, time, torch
from collab_decode.demo import checkpoint_dir
from collab_decode.demo.task import problems
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.bench.measure import timed_config
from collab_decode.engine.loading import build_engine
from collab_decode.sampling import SamplingParams

policies, num_batch1, num_batched = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
try:  # the demo pair's shipped router, on revisions that have one (for neural:demo)
    from collab_decode.pairs import pair_routers
    engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"), routers=pair_routers("demo"),
                          config=timed_config())
except ImportError:
    engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"), config=timed_config())
prompts = [engine.tokenizer(chat_prompt(p.question), add_special_tokens=False)["input_ids"]
           for p in problems("heldout", num_batched)]
greedy = SamplingParams(max_tokens=400, temperature=0.0)
engine.generate(prompts[:4], greedy, "large"); engine.generate(prompts[:4], greedy, "entropy:0.3")  # warm-up
out = {}
for policy in policies:
    t0 = time.perf_counter()
    n = sum(len(engine.generate([p], greedy, policy)[0].token_ids) for p in prompts[:num_batch1])
    out[f"{policy} batch 1"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = sum(len(r.token_ids) for r in engine.generate(prompts, greedy, policy))
    out[f"{policy} batch {num_batched}"] = n / (time.perf_counter() - t0)
print(json.dumps(out))
'''


def measure(tree: Path, policies: list[str], num_batch1: int, num_batched: int) -> dict[str, float]:
    """One fresh process on `tree`'s code: tokens/s per '<policy> batch <n>'."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(policies), str(num_batch1), str(num_batched)],
                          cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# builds a revision's C modules in its tree, as `pip install -e .` does in a checkout (a worktree has only the sources)
BUILD = r'''
from pathlib import Path
from setuptools import Extension
from setuptools.dist import Distribution
sources = sorted(Path("collab_decode").glob("_*.c"))
if sources:
    dist = Distribution({"ext_modules": [Extension(f"collab_decode.{s.stem}", [str(s)]) for s in sources]})
    command = dist.get_command_obj("build_ext")
    command.inplace = True
    dist.run_command("build_ext")
'''


def build_extensions(tree: Path) -> None:
    subprocess.run([sys.executable, "-c", BUILD], cwd=tree, check=True, capture_output=True)


def serve_and_drive(trees: dict[str, Path], policies: list[str], levels: list[int], rounds: int) -> dict:
    """--server: (label, level, policy) -> [tokens/s, TTFT p50 ms, TTFT p95 ms] per round."""
    import asyncio

    from collab_decode.bench.load import RestSender, drive_server
    from collab_decode.bench.suite import ServerProcess, num_requests
    from collab_decode.bench.workload import demo_workload
    from collab_decode.demo import checkpoint_dir
    from collab_decode.engine.loading import load_tokenizer
    from collab_decode.pairs import pair_routers
    from collab_decode.serve.cli import default_threads, usable_cores

    small, large = str(checkpoint_dir("small")), str(checkpoint_dir("large"))
    routers = [f"{name}={path}" for name, path in pair_routers("demo").items()]
    workload = demo_workload(load_tokenizer(small), 200)
    servers = {label: ServerProcess(small, large, default_threads(), routers, usable_cores(), code=str(tree))
               for label, tree in trees.items()}
    results: dict[tuple, list] = {}
    loop = asyncio.new_event_loop()
    try:
        senders = {label: RestSender(s.url, workload) for label, s in servers.items()}
        for label, sender in senders.items():  # warm-up
            loop.run_until_complete(drive_server(sender, "large", 4, 4))
        for r in range(rounds):
            for level in levels:
                for policy in policies:
                    for label, sender in senders.items():
                        m = loop.run_until_complete(drive_server(sender, policy, num_requests(level, 24), level))
                        row = [m.tokens_per_s, *m.percentiles_ms("ttft_s")]
                        results.setdefault((label, level, policy), []).append(row)
                        print(f"round {r + 1} {label:6} concurrency {level} {policy}: {row[0]:.0f} tok/s, TTFT p50 "
                              f"{row[1]:.1f} ms, p95 {row[2]:.1f} ms", flush=True)
        for sender in senders.values():
            loop.run_until_complete(sender.close())
    finally:
        loop.close()
        for server in servers.values():
            server.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=["large", "entropy:0.3"])
    parser.add_argument("--batch1-problems", type=int, default=8, help="problems run one at a time")
    parser.add_argument("--batch", type=int, default=64, help="problems run at once")
    parser.add_argument("--server", action="store_true", help="each revision's server over REST instead")
    parser.add_argument("--levels", type=int, nargs="+", default=[16, 64], help="--server: concurrencies")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory(prefix="speed-compare-") as tmp:
        trees = {}
        for label, rev in (("before", args.before), ("after", args.after)):
            trees[label] = Path(tmp) / label
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(trees[label]), rev], cwd=ROOT, check=True)
            build_extensions(trees[label])
        try:
            if args.server:
                return report_server(serve_and_drive(trees, args.policies, args.levels, args.rounds))
            for r in range(args.rounds):
                for label in ("before", "after"):
                    row = measure(trees[label], args.policies, args.batch1_problems, args.batch)
                    for key, value in row.items():
                        results[label].setdefault(key, []).append(value)
                    print(f"round {r + 1} {label:6}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in row.items()),
                          flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    print("\nmedian tokens/s (after / before):")
    for key in results["before"]:
        b, a = statistics.median(results["before"][key]), statistics.median(results["after"][key])
        print(f"  {key:28} before {b:7.0f}  after {a:7.0f}  ratio {a / b:.3f}")
    return 0


def report_server(results: dict) -> int:
    print("\nmedians (after / before):")
    for (label, level, policy), rows in results.items():
        if label != "before":
            continue
        before = [statistics.median(column) for column in zip(*rows)]
        after = [statistics.median(column) for column in zip(*results[("after", level, policy)])]
        print(f"  concurrency {level:3} {policy:12} tok/s {before[0]:6.0f} -> {after[0]:6.0f} "
              f"({after[0] / before[0]:.3f}); "
              f"TTFT p50 {before[1]:6.1f} -> {after[1]:6.1f} ms ({after[1] / before[1]:.3f}), "
              f"p95 {before[2]:6.1f} -> {after[2]:6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
