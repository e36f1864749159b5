"""Demo-pair benchmark: accuracy against large share per routing policy, and decode speed at batch 1.

Accuracy (greedy, held-out problems): the entropy threshold whose large share is closest to
`--target-share` is found by bisection on a calibration slice (held-out problems apart from the
reported ones); then, all on the same reported problems: `small` and `large` alone, `entropy` at that
threshold, `random` at the share entropy actually reached, and the curves of entropy, random and
step-entropy over threshold sweeps (step-entropy's best setting is the most accurate of its sweep).
Speed (batch 1, same engine, same run): output tokens/s of small, large, entropy, speculative:4, and
the engine's own time per step outside the two models' forwards.

    python -m collab_decode.bench.pair_bench [--num-problems 200] [--out bench_results/pair]
Writes pair_bench.json, pair_bench.md and pair_bench.png (accuracy vs large share).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from collab_decode.demo.evaluate import evaluate
from collab_decode.bench.workload import demo_workload
from collab_decode.sampling import SamplingParams

CALIBRATION_OFFSET = 600_000  # held-out indices used to pick thresholds, apart from the reported [0, n)
ENTROPY_SWEEP = (0.03, 0.3)  # nats; with the calibrated threshold, the entropy curve on the reported problems
RANDOM_SWEEP = (0.3,)
STEP_SWEEP = (0.2, 0.6, 1.2)


def calibrate_entropy(engine, target: float, num: int, iterations: int = 7) -> tuple[float, list[dict]]:
    """The entropy threshold whose large share on the calibration slice is closest to `target`.

    Large share falls as the threshold rises, so a bisection on log(threshold) over [1e-3, 4] nats finds it.
    """
    lo, hi, rows = math.log(1e-3), math.log(4.0), []
    for _ in range(iterations):
        t = float(f"{math.exp((lo + hi) / 2):.3g}")
        rows.append(_summary(evaluate(engine, num, CALIBRATION_OFFSET, f"entropy:{t}", progress=False)))
        print(f"  calibration {rows[-1]['policy']}: large share {rows[-1]['large_share']:.1%}", flush=True)
        if rows[-1]["large_share"] > target:
            lo = math.log(t)
        else:
            hi = math.log(t)
    best = min(rows, key=lambda r: abs(r["large_share"] - target))
    return float(best["policy"].split(":")[1]), rows


def _summary(report: dict) -> dict:
    return {k: report[k] for k in ("policy", "accuracy", "large_share", "num_problems", "tokens_per_s")}


def accuracy_table(engine, num: int, target: float, num_calibration: int) -> dict:
    """Every policy on the same reported problems [0, num): the headline pair, then the curves."""
    threshold, calibration = calibrate_entropy(engine, target, num_calibration)
    print(f"calibrated entropy threshold for ~{target:.0%} large share: {threshold}", flush=True)

    def run(policy: str) -> dict:
        row = _summary(evaluate(engine, num, 0, policy, progress=False))
        print(f"  {policy}: accuracy {row['accuracy']:.1%}, large share {row['large_share']:.1%}", flush=True)
        return row

    rows = [run("small"), run("large"), run(f"entropy:{threshold}")]
    headline = {"entropy": rows[-1], "random": run(f"random:{rows[-1]['large_share']:.4f}")}
    rows.append(headline["random"])
    rows += [run(f"entropy:{t}") for t in ENTROPY_SWEEP if t != threshold]
    rows += [run(f"random:{p}") for p in RANDOM_SWEEP]
    step_rows = [run(f"step-entropy:{t}") for t in STEP_SWEEP]
    rows += step_rows
    # step-entropy's best setting: the highest accuracy, the smaller large share breaking ties
    headline["step-entropy"] = max(step_rows, key=lambda r: (r["accuracy"], -r["large_share"]))
    return {"entropy_threshold": threshold, "target_share": target, "calibration": calibration,
            "headline": headline, "rows": rows}


def speed_table(engine, num_prompts: int, policies: list[str]) -> list[dict]:
    prompts = demo_workload(engine.tokenizer, num_prompts).prompt_ids
    sampling = SamplingParams(max_tokens=300, temperature=0.0)
    for policy in policies:  # warm up every path (and compile, with --compile) before timing
        engine.generate(prompts[:1], SamplingParams(max_tokens=24, temperature=0.0), policy)
    rows = []
    for policy in policies:
        num_tokens, seconds, step_total, step_forward, num_steps = 0, 0.0, 0.0, 0.0, 0
        for prompt in prompts:  # batch 1
            engine.add_request(prompt, sampling, policy, stream_text=False)
            start = time.perf_counter()
            while engine.has_unfinished():
                for out in engine.step():
                    num_tokens += len(out.new_token_ids)
                s = engine.last_step
                step_total += s.total
                step_forward += s.small_forward + s.large_forward
                num_steps += 1
            seconds += time.perf_counter() - start
        rows.append({"policy": policy, "tokens_per_s": round(num_tokens / seconds, 1),
                     "ms_per_step": round(1000 * step_total / num_steps, 3),
                     "engine_overhead_ms_per_step": round(1000 * (step_total - step_forward) / num_steps, 3)})
        print(rows[-1], flush=True)
    return rows


def plot(acc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[str, list[dict]] = {}
    for row in acc["rows"]:
        groups.setdefault(row["policy"].split(":")[0], []).append(row)
    for name, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["large_share"])
        ax.plot([r["large_share"] for r in rows], [r["accuracy"] for r in rows], "o-" if len(rows) > 1 else "o",
                label=name)
    for name, row in acc.get("headline", {}).items():
        ax.annotate(f"{name} {row['accuracy']:.0%}", (row["large_share"], row["accuracy"]), fontsize=8,
                    xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("large share (fraction of output tokens from the large model)")
    ax.set_ylabel("accuracy (held-out, greedy)")
    ax.set_title("demo pair: accuracy vs large share")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(acc: dict, speed: list[dict]) -> str:
    lines = []
    if acc.get("headline"):
        h = acc["headline"]
        lines += [f"At ~{acc['target_share']:.0%} large share "
                  f"(entropy threshold {acc['entropy_threshold']} calibrated on "
                  f"separate problems): entropy {h['entropy']['accuracy']:.1%} at {h['entropy']['large_share']:.1%}, "
                  f"random {h['random']['accuracy']:.1%} at {h['random']['large_share']:.1%}; best step-entropy: "
                  f"{h['step-entropy']['policy']} {h['step-entropy']['accuracy']:.1%} at "
                  f"{h['step-entropy']['large_share']:.1%}.", ""]
    lines += ["| policy | accuracy | large share |", "|---|---|---|"]
    lines += [f"| {r['policy']} | {r['accuracy']:.1%} | {r['large_share']:.1%} |" for r in acc["rows"]]
    if speed:
        lines += ["", "| policy (batch 1) | tokens/s | ms/step | engine overhead ms/step |", "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['tokens_per_s']} | {r['ms_per_step']} | {r['engine_overhead_ms_per_step']} |"
              for r in speed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from collab_decode.demo import checkpoint_dir
    from collab_decode.bench.measure import timed_config
    from collab_decode.engine.loading import build_engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-problems", type=int, default=200)
    parser.add_argument("--num-calibration", type=int, default=40)
    parser.add_argument("--target-share", type=float, default=0.15)
    parser.add_argument("--num-speed-prompts", type=int, default=5)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--entropy-threshold", type=float, default=0.009,
                        help="with --skip-accuracy: the entropy policy's threshold in the speed table")
    parser.add_argument("--skip-speed", action="store_true",
                        help="accuracy only (e.g. while the machine is busy: speed needs it quiet)")
    parser.add_argument("--compile", action="store_true", help="torch.compile decode steps of both models")
    parser.add_argument("--out", default="bench_results/pair")
    args = parser.parse_args(argv)
    engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"), compile=args.compile, config=timed_config())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    acc = {"rows": [], "entropy_threshold": args.entropy_threshold} if args.skip_accuracy else \
        accuracy_table(engine, args.num_problems, args.target_share, args.num_calibration)
    speed = [] if args.skip_speed else speed_table(
        engine, args.num_speed_prompts, ["small", "large", f"entropy:{acc['entropy_threshold']}", "speculative:4"])
    (out / "pair_bench.json").write_text(json.dumps({"accuracy": acc, "speed": speed}, indent=2))
    (out / "pair_bench.md").write_text(markdown(acc, speed))
    if acc["rows"]:
        plot(acc, out / "pair_bench.png")
    print(markdown(acc, speed))
    print(f"wrote {out}/pair_bench.json, .md" + (", .png" if acc["rows"] else ""))


if __name__ == "__main__":
    main()
