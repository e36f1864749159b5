"""Demo-pair decode speed of two revisions, side by side: A B A B ... in one run on one machine.

    .venv/bin/python tools/speed_compare.py BEFORE_REV AFTER_REV [--rounds 3] [--policies large entropy:0.3]

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=["large", "entropy:0.3"])
    parser.add_argument("--batch1-problems", type=int, default=8, help="problems run one at a time")
    parser.add_argument("--batch", type=int, default=64, help="problems run at once")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory(prefix="speed-compare-") as tmp:
        trees = {}
        for label, rev in (("before", args.before), ("after", args.after)):
            trees[label] = Path(tmp) / label
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(trees[label]), rev], cwd=ROOT, check=True)
            build_extensions(trees[label])
        try:
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


if __name__ == "__main__":
    sys.exit(main())
