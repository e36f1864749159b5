"""The neural router against the training-free rules on the demo pair, in one run.

    collab-decode bench router [--router router_models/demo] [--num-problems 500] [--out docs/results/router]

Accuracy (greedy, held-out problems [0, N), every policy on the same problems in one process): `large` and
`small` alone, `neural` over a threshold sweep, `entropy` over a threshold sweep, `random` over shares.
The verdict: the smallest large share at which each family keeps 97% of the large model's accuracy, their
ratio (neural / entropy), and whether neural beats entropy at every share of the sweep's common range
(entropy's accuracy interpolated at each neural point's share).

Speed: batch-1 tokens/s of `neural` at its operating point (the threshold with the smallest share that
keeps 97%) against `large`, alternating A B A B on the same problems; and the router's cost: its decide
time per step over the small model's forward time per step, at batch 1 and batch 64.

Writes router_sweep.json, router_sweep.md and router_sweep.png (accuracy against large share).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from collab_decode.bench.workload import demo_workload
from collab_decode.demo.evaluate import evaluate
from collab_decode.routing.neural import threshold_for_share
from collab_decode.sampling import SamplingParams
from collab_decode.serve.cli import default_threads

KEEP = 0.97  # of the large model's accuracy
# neural: the thresholds its calibration table gives for these large shares (on validation rows), so the sweep
# spans the same range of shares whatever the router's score scale
NEURAL_SHARES = (0.04, 0.035, 0.032, 0.03, 0.029, 0.028, 0.027, 0.026, 0.025, 0.024, 0.022, 0.02)
ENTROPY_SWEEP = (0.6, 0.8, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0)
RANDOM_SWEEP = (0.03, 0.1, 0.3)


def accuracy_rows(engine, num: int, policies: list[str]) -> list[dict]:
    rows = []
    for i, policy in enumerate(policies):
        t0 = time.perf_counter()
        r = evaluate(engine, num, 0, policy, progress=False)
        rows.append({k: r[k] for k in ("policy", "accuracy", "large_share", "num_problems", "tokens_per_s")})
        print(f"[{i + 1}/{len(policies)}] {policy:22} accuracy {r['accuracy']:6.1%}  large share "
              f"{r['large_share']:6.2%}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def family(rows: list[dict], name: str) -> list[dict]:
    return sorted((r for r in rows if r["policy"].split(":")[0] == name), key=lambda r: r["large_share"])


def smallest_share(rows: list[dict], floor: float) -> dict | None:
    """The row with the smallest large share whose accuracy is at least `floor`."""
    ok = [r for r in rows if r["accuracy"] >= floor]
    return min(ok, key=lambda r: r["large_share"]) if ok else None


def interpolate(rows: list[dict], share: float) -> float | None:
    """Accuracy of a family (sorted by share) at `share`, linear between its points; None outside them."""
    for a, b in zip(rows, rows[1:]):
        if a["large_share"] <= share <= b["large_share"]:
            if b["large_share"] == a["large_share"]:
                return max(a["accuracy"], b["accuracy"])
            w = (share - a["large_share"]) / (b["large_share"] - a["large_share"])
            return a["accuracy"] + w * (b["accuracy"] - a["accuracy"])
    return None


def verdict(rows: list[dict]) -> dict:
    large = next(r for r in rows if r["policy"] == "large")
    floor = KEEP * large["accuracy"]
    neural, entropy = family(rows, "neural"), family(rows, "entropy")
    best_neural, best_entropy = smallest_share(neural, floor), smallest_share(entropy, floor)
    ratio = (best_neural["large_share"] / best_entropy["large_share"]
             if best_neural and best_entropy else None)
    against = []
    for r in neural:
        e = interpolate(entropy, r["large_share"])
        if e is not None:
            against.append({"policy": r["policy"], "large_share": r["large_share"], "neural": r["accuracy"],
                            "entropy": round(e, 4), "beats": r["accuracy"] >= e})
    return {"accuracy_floor": floor, "neural": best_neural, "entropy": best_entropy, "share_ratio": ratio,
            "share_ratio_ok": ratio is not None and ratio <= 0.75, "against_entropy": against,
            "beats_entropy_everywhere": bool(against) and all(a["beats"] for a in against)}


def batch1_speed(engine, policies: list[str], num: int, rounds: int) -> dict:
    """Tokens/s at batch 1 per policy, alternating policies round by round on the same problems."""
    prompts = demo_workload(engine.tokenizer, num).prompt_ids
    greedy = SamplingParams(max_tokens=400, temperature=0.0)
    for policy in policies:
        engine.generate(prompts[:2], greedy, policy)  # warm-up
    tokens = {p: 0 for p in policies}
    seconds = {p: 0.0 for p in policies}
    for _ in range(rounds):
        for policy in policies:
            t0 = time.perf_counter()
            tokens[policy] += sum(len(engine.generate([x], greedy, policy)[0].token_ids) for x in prompts)
            seconds[policy] += time.perf_counter() - t0
    out = {p: round(tokens[p] / seconds[p], 1) for p in policies}
    print("batch-1 tokens/s: " + ", ".join(f"{p} {v:.0f}" for p, v in out.items()), flush=True)
    return out


def router_cost(engine, policy: str, batch_sizes: tuple[int, ...] = (1, 64), max_tokens: int = 200) -> dict:
    """Per batch size: the routers' decide time over the small model's forward time, summed over decode
    steps (steps where every sequence is decoding one token)."""
    out = {}
    for b in batch_sizes:
        prompts = demo_workload(engine.tokenizer, b, 10_000).prompt_ids
        engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0), policy)  # warm-up at this batch
        for prompt in prompts:
            engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), policy,
                               stream_text=False)
        route = small = 0.0
        steps = 0
        while engine.has_unfinished():
            running = engine.scheduler.running
            decoding = len(running) == b and all(s.num_output_tokens > 0 for s in running)  # prefill done
            engine.step()
            t = engine.last_step
            if decoding and t.large_forward == 0.0:  # a full-batch decode step the small model wrote
                route, small, steps = route + t.route, small + t.small_forward, steps + 1
        out[f"batch {b}"] = {"route_ms": round(1000 * route / max(1, steps), 4),
                             "small_forward_ms": round(1000 * small / max(1, steps), 4),
                             "route_of_small": round(route / small, 4) if small else None, "steps": steps}
        print(f"router cost at batch {b}: {out[f'batch {b}']}", flush=True)
    return out


def plot(rows: list[dict], v: dict, path: Path) -> None:
    """Accuracy against large share per family: the whole range (log share), and the knee (linear)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    large = next(r for r in rows if r["policy"] == "large")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, zoom in zip(axes, (False, True)):
        for name, style in (("neural", "o-"), ("entropy", "s-"), ("random", "^-")):
            fam = family(rows, name)
            ax.plot([100 * r["large_share"] for r in fam], [100 * r["accuracy"] for r in fam], style, label=name)
        ax.axhline(100 * large["accuracy"], color="gray", lw=0.8, label=f"large alone ({large['accuracy']:.1%})")
        ax.axhline(100 * v["accuracy_floor"], color="gray", ls="--", lw=0.8, label="97% of large")
        ax.set_xlabel("large share (% of output tokens from the large model" + (")" if zoom else ", log)"))
        ax.grid(alpha=0.3, which="both")
        if zoom:  # from below the smallest share that keeps 97% of large, either family's, to 4.5%
            kept = [100 * p["large_share"] for p in (v["neural"], v["entropy"]) if p]
            ax.set_xlim(min(kept + [2.5]) - 0.3, 4.5)
            ax.set_ylim(60, 101)
            ax.set_title("the knee")
        else:
            ax.set_xscale("log")
            ax.set_xticks([1, 2, 3, 4, 5, 10, 20, 40])
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.set_ylabel(f"accuracy (%, {large['num_problems']} held-out problems, greedy)")
            ax.set_title("demo pair: neural router vs entropy vs random")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    v = report["verdict"]
    lines = [f"# Router sweep ({report['num_problems']} held-out demo problems, greedy, one run)", "",
             f"Command: `{report['command']}`", "", "| policy | accuracy | large share | tok/s (batch 64) |",
             "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['policy']} | {r['accuracy']:.1%} | {r['large_share']:.2%} | {r['tokens_per_s']:.0f} |")

    def at(row):
        return f"{row['policy']} ({row['accuracy']:.1%} at {row['large_share']:.2%})" if row else "none"
    ratio = "-" if v["share_ratio"] is None else f"{v['share_ratio']:.3f}"
    lines += ["", f"Smallest share keeping {KEEP:.0%} of the large model's accuracy (>= {v['accuracy_floor']:.1%}): "
              f"neural {at(v['neural'])}, entropy {at(v['entropy'])}; ratio {ratio} "
              f"({'ok' if v['share_ratio_ok'] else 'SHORT'}: at most 0.75).",
              f"Neural beats entropy at every share of the common range: "
              f"{'yes' if v['beats_entropy_everywhere'] else 'NO'}.", ""]
    if report.get("speed"):
        lines.append("Batch-1 tokens/s (alternating, same problems): "
                     + ", ".join(f"{p} {s:.0f}" for p, s in report["speed"].items())
                     + (f" (measured again by `{report['speed_command']}`)" if report.get("speed_command") else ""))
    if report.get("router_cost"):
        lines.append("Router cost (decide time / small forward time per decode step): "
                     + ", ".join(f"{k} {c['route_of_small']:.1%}" for k, c in report["router_cost"].items()
                                 if c["route_of_small"] is not None))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="collab-decode bench router", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="router_models/demo", help="router checkpoint directory")
    parser.add_argument("--num-problems", type=int, default=500)
    parser.add_argument("--neural", type=float, nargs="+", help="neural thresholds (default: those of the "
                        "router's calibration table at --neural-shares)")
    parser.add_argument("--neural-shares", type=float, nargs="+", default=list(NEURAL_SHARES),
                        help="large shares whose calibrated thresholds the neural sweep uses")
    parser.add_argument("--entropy", type=float, nargs="+", default=list(ENTROPY_SWEEP), help="entropy thresholds")
    parser.add_argument("--random", type=float, nargs="+", default=list(RANDOM_SWEEP), help="random shares")
    parser.add_argument("--speed-problems", type=int, default=10, help="problems per batch-1 speed round")
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--out", default="docs/results/router")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help=f"torch threads (default: serve's, {default_threads()} here)")
    parser.add_argument("--speed-only", action="store_true",
                        help="keep the accuracy rows of OUT/router_sweep.json; measure speed and router cost again "
                             "(e.g. once the machine is quiet)")
    args = parser.parse_args(argv)
    import sys

    from collab_decode.demo import checkpoint_dir
    from collab_decode.bench.measure import timed_config
    from collab_decode.engine.loading import build_engine

    torch.set_num_threads(args.threads)  # the server's engine setting: costs measured as served
    start = time.perf_counter()
    out = Path(args.out)
    name = Path(args.router).name
    engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"), routers={name: args.router},
                          config=timed_config())
    if args.neural is None:
        table = engine.router_context.routers[name].config["calibration"]
        args.neural = sorted({round(threshold_for_share(table, s), 6) for s in args.neural_shares})
    command = "collab-decode bench router " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.speed_only:
        report = json.loads((out / "router_sweep.json").read_text())
        report["speed_command"] = command
    else:
        policies = (["large", "small"] + [f"neural:{name}:{t}" for t in args.neural]
                    + [f"entropy:{t}" for t in args.entropy] + [f"random:{p}" for p in args.random])
        rows = accuracy_rows(engine, args.num_problems, policies)
        report = {"command": command, "router": args.router, "num_problems": args.num_problems, "rows": rows,
                  "verdict": verdict(rows)}
    rows, v = report["rows"], report["verdict"]
    operating = (v["neural"] or {}).get("policy", f"neural:{name}:{args.neural[len(args.neural) // 2]}")
    speed = batch1_speed(engine, ["large", operating], args.speed_problems, args.speed_rounds)
    report.update({"operating_point": operating, "speed": speed,
                   "speedup_over_large": round(speed[operating] / speed["large"], 3),
                   "router_cost": router_cost(engine, operating),
                   "minutes": round((time.perf_counter() - start) / 60, 1)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_sweep.json").write_text(json.dumps(report, indent=2))
    (out / "router_sweep.md").write_text(markdown(report))
    plot(rows, v, out / "router_sweep.png")
    print(markdown(report))
    print(f"wrote {out}/router_sweep.json, .md, .png ({report['minutes']} min)")
