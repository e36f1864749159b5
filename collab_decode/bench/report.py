"""Benchmark runs: the rows of a report, their speedups and bounds, and the checks of the issue.

    runs = [make_run(...) per (mode, policy, batch size or concurrency)]   repeats folded into one row
    add_speedups(runs)        speedup against `large` and the bound, both within the same mode and batch
    checks(runs)              the issue's "must show" figures, each with its numbers
    figures.write_report(out, runs, meta)   the files (bench/figures.py)

speedup = tokens/s / tokens/s of `large` alone (same mode, same batch size or concurrency, same run).
bound = 1 / (c_small / c_large + large_share), where c_small / c_large = tokens/s of `large` / tokens/s of
`small` alone, measured in the same run at the same batch: what routing could reach if the engine cost
nothing beyond each model's own decode steps and the large model's catch-up were free.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from collab_decode.bench.measure import Measurement
from collab_decode.routing import parse_routing

ACCURACY_FLOOR = 0.97  # a routed policy counts when it keeps this fraction of the large model's accuracy


@dataclass
class Run:
    mode: str  # "engine" (in process, Python API) | "rest" | "grpc" (a server, driven over the network)
    policy: str
    family: str  # the policy's name without its argument: one curve per family in pareto.png
    threshold: float | None  # the policy's threshold (random: p); speculative: k
    batch_size: int | None  # engine runs: requests in flight
    concurrency: int | None  # server runs: requests in flight
    num_requests: int  # per repeat
    accuracy: float | None  # fraction of right answers, over accuracy_requests answers
    accuracy_requests: int
    large_share: float  # fraction of output tokens the large model wrote (this run's requests)
    tokens_per_s: float  # output tokens / wall second, the median over repeats
    tokens_per_s_repeats: list[float]
    # the repeats taken side by side with the other modes (stage 3, `bench load`), in repeat order: repeat i of
    # every mode at this level ran in the same minutes, so ratios between modes pair them (paired_ratio)
    tokens_per_s_paired: list[float]
    ttft_ms_p50: float | None
    tpot_ms_p50: float | None
    tpot_ms_p95: float | None
    e2e_ms_p50: float | None
    e2e_ms_p95: float | None
    speedup: float | None = None  # tokens_per_s / that of `large` (same mode and batch)
    bound: float | None = None  # 1 / (c_small / c_large + large_share), same mode and batch
    of_bound: float | None = None  # speedup / bound
    # speedup / bound within each pass: repeat i of this row against repeat i of `small` and `large`, which ran in
    # the same pass over the policies (the same minutes of a noisy machine); as many as the three rows share
    of_bound_repeats: list[float] = field(default_factory=list)
    breakdown: dict | None = None  # engine runs: where the time per token went (ms), see step_breakdown
    client_cpu_share: float | None = None  # server runs: the load generator's CPU seconds / wall seconds
    server_cpu_share: dict | None = None  # server runs started here: CPU seconds / wall seconds of the
    #   server's process ("api": event loop, network, engine client) and of its engine process ("engine")

    @property
    def level(self) -> int:
        return self.batch_size if self.batch_size is not None else self.concurrency

    @property
    def routed(self) -> bool:
        return self.policy not in ("small", "large")


def make_run(mode: str, policy: str, level: int, repeats: list[Measurement], workload,
             accuracy: tuple[float, int] | None = None) -> Run:
    """One row from a policy's repeats at one batch size (engine) or concurrency (server). `accuracy`
    (value, number of answers) overrides the accuracy of the repeats' own answers (a larger set)."""
    spec = parse_routing(policy)
    pooled = Measurement(sum(m.seconds for m in repeats), [r for m in repeats for r in m.results])
    first = repeats[0]
    acc = accuracy if accuracy is not None else (first.accuracy(workload), len(first.results))
    ttft, tpot, e2e = (pooled.percentiles_ms(name) for name in ("ttft_s", "tpot_s", "e2e_s"))
    run = Run(mode=mode, policy=policy, family=spec.policy, threshold=spec.threshold if spec.k is None else spec.k,
              batch_size=level if mode == "engine" else None, concurrency=None if mode == "engine" else level,
              num_requests=len(first.results), accuracy=round(acc[0], 4), accuracy_requests=acc[1],
              large_share=round(pooled.large_share, 4),
              tokens_per_s=round(statistics.median(m.tokens_per_s for m in repeats), 1),
              tokens_per_s_repeats=[round(m.tokens_per_s, 1) for m in repeats],
              tokens_per_s_paired=[round(m.tokens_per_s, 1) for m in sorted(
                  (m for m in repeats if "pair" in m.extra), key=lambda m: m.extra["pair"])],
              ttft_ms_p50=ttft[0], tpot_ms_p50=tpot[0], tpot_ms_p95=tpot[1], e2e_ms_p50=e2e[0], e2e_ms_p95=e2e[1])
    if first.steps is not None:
        run.breakdown = step_breakdown(repeats)
    if first.client_cpu_s is not None:
        run.client_cpu_share = round(sum(m.client_cpu_s for m in repeats) / pooled.seconds, 3)
    if "server_cpu_s" in first.extra:
        run.server_cpu_share = {k: round(sum(m.extra["server_cpu_s"][k] for m in repeats) / pooled.seconds, 3)
                                for k in first.extra["server_cpu_s"]}
    return run


def step_breakdown(repeats: list[Measurement]) -> dict:
    """ms per output token by part, over all repeats: the models' forwards, the engine's own step work
    (scheduling, sampling, routing, commit, detokenizing), and the driver loop around the steps."""
    tokens = sum(m.num_tokens for m in repeats)
    steps = [m.steps for m in repeats]
    calls = sum(r.num_large_calls for m in repeats for r in m.results)
    catchup = sum(r.num_catchup_tokens for m in repeats for r in m.results)
    num_steps = sum(s.num_steps for s in steps)

    def per_token(seconds: float) -> float:
        return round(1000 * seconds / tokens, 4)

    large_s = sum(s.large_forward_s for s in steps)
    return {"ms_per_token": per_token(sum(m.seconds for m in repeats)),
            "small_forward": per_token(sum(s.small_forward_s for s in steps)),
            "large_forward": per_token(large_s),
            "engine": per_token(sum(s.engine_s for s in steps)),
            "outside_steps": per_token(sum(m.seconds - s.step_s for m, s in zip(repeats, steps))),
            "steps_per_token": round(num_steps / tokens, 4),
            "engine_ms_per_step": round(1000 * sum(s.engine_s for s in steps) / num_steps, 4),
            "route_ms_per_step": round(1000 * sum(s.route_s for s in steps) / num_steps, 4),
            "small_forward_ms_per_step": round(1000 * sum(s.small_forward_s for s in steps) / num_steps, 4),
            "large_calls_per_token": round(calls / tokens, 4),
            "large_ms_per_call": round(1000 * large_s / calls, 4) if calls else None,
            "catchup_tokens_per_call": round(catchup / calls, 2) if calls else None}


def add_speedups(runs: list[Run]) -> None:
    """Fill speedup, bound and of_bound from the `small` and `large` rows of the same mode and batch."""
    for run in runs:
        ref = {r.policy: r for r in runs if (r.mode, r.level) == (run.mode, run.level)}
        if "large" in ref:
            run.speedup = round(run.tokens_per_s / ref["large"].tokens_per_s, 3)
        if "large" in ref and "small" in ref and run.policy != "large":  # (large alone is no routing)
            cost_ratio = ref["large"].tokens_per_s / ref["small"].tokens_per_s  # c_small / c_large
            run.bound = round(1 / (cost_ratio + run.large_share), 3)
            run.of_bound = round(run.speedup / run.bound, 3)
            passes = zip(run.tokens_per_s_repeats, ref["small"].tokens_per_s_repeats, ref["large"].tokens_per_s_repeats)
            run.of_bound_repeats = [round(routed / large * (large / small + run.large_share), 3)
                                    for routed, small, large in passes]
        if run.breakdown is not None and "small" in ref and ref["small"].breakdown is not None:
            small_step = ref["small"].breakdown["small_forward_ms_per_step"]
            run.breakdown["engine_of_small_step"] = round(run.breakdown["engine_ms_per_step"] / small_step, 3)
            run.breakdown["route_of_small_step"] = round(run.breakdown["route_ms_per_step"] / small_step, 3)


def best_routed(runs: list[Run], mode: str, level: int) -> Run | None:
    """The fastest routed policy at >= ACCURACY_FLOOR of `large`'s accuracy (same mode and batch)."""
    rows = [r for r in runs if (r.mode, r.level) == (mode, level)]
    large = next((r for r in rows if r.policy == "large"), None)
    if large is None or large.accuracy is None:
        return None
    good = [r for r in rows if r.routed and r.speedup is not None and r.accuracy is not None
            and r.accuracy >= ACCURACY_FLOOR * large.accuracy]
    return max(good, key=lambda r: r.speedup, default=None)


def find(runs: list[Run], mode: str, level: int, policy: str) -> Run | None:
    return next((r for r in runs if (r.mode, r.level, r.policy) == (mode, level, policy)), None)


def paired_ratio(a: Run, b: Run) -> tuple[float, list[float]]:
    """tokens/s of a over b: the median of the ratios of their side-by-side repeats (taken in the same minutes
    of a noisy machine), with those ratios; the ratio of their medians where they have no such pairs."""
    if a.tokens_per_s_paired and len(a.tokens_per_s_paired) == len(b.tokens_per_s_paired):
        pairs = [x / y for x, y in zip(a.tokens_per_s_paired, b.tokens_per_s_paired)]
        return statistics.median(pairs), [round(x, 3) for x in pairs]
    return a.tokens_per_s / b.tokens_per_s, []


def checks(runs: list[Run], server_mode: str = "rest", routed: str | None = None) -> list[dict]:
    """The issue's "must show" figures: each {what, value, target, ok}; absent rows are skipped. A server /
    engine ratio pairs the repeats run side by side (`pairs`: each pair's ratio; `of_medians`: the ratio of
    the rows' medians, which pools the engine's batch-1 repeats of stage 2, run minutes earlier).
    `routed`: the routed policy the figures follow, the one `bench run` chose at batch 1 and served (stage 3
    pools more batch-1 repeats into its row, which may reorder the policies afterwards: the figures stay
    with the one the server ran); None: the fastest at batch 1 now (`bench load`, which chooses nothing)."""
    out = []

    def check(what: str, value: float | None, target: float, at_most: bool = False, **more) -> None:
        if value is not None:
            ok = value <= target if at_most else value >= target
            out.append({"what": what, "value": round(value, 3), "target": target, "ok": ok,
                        **({"at_most": True} if at_most else {}), **more})

    best1 = best_routed(runs, "engine", 1) if routed is None else find(runs, "engine", 1, routed)
    for level, target in ((1, 0.90), (64, 0.85)):
        for policy in ["large"] + ([best1.policy] if best1 else []):
            engine, server = find(runs, "engine", level, policy), find(runs, server_mode, level, policy)
            if engine and server:
                ratio, pairs = paired_ratio(server, engine)
                check(f"server ({server_mode}) / engine tokens/s, {policy}, concurrency = batch {level}", ratio,
                      target, pairs=pairs, of_medians=round(server.tokens_per_s / engine.tokens_per_s, 3))
    if best1 is not None:
        large = find(runs, "engine", 1, "large")
        if large.accuracy:  # (random models answer nothing right: no ratio)
            check(f"batch 1, {best1.policy}: accuracy / large's", best1.accuracy / large.accuracy, ACCURACY_FLOOR)
        check(f"batch 1, {best1.policy}: speedup", best1.speedup, 3.0)
        passes = best1.of_bound_repeats  # pass by pass, as the server / engine ratios pair their repeats
        check(f"batch 1, {best1.policy}: speedup / bound", statistics.median(passes) if passes else best1.of_bound,
              0.85, **({"pairs": passes, "of_medians": best1.of_bound} if passes else {}))
    for policy in ["small"] + ([best1.policy] if best1 else []):  # the engine's own time per step, at batch 1
        run = find(runs, "engine", 1, policy)
        if run is not None and run.breakdown is not None and "engine_of_small_step" in run.breakdown:
            check(f"batch 1, {policy}: the engine's own time per step / the small model's step",
                  run.breakdown["engine_of_small_step"], 0.10, at_most=True)
    for level, target in ((16, 1.5), (64, 1.3)):  # the policy chosen at batch 1 (its accuracy: the big set's)
        server = find(runs, server_mode, level, best1.policy) if best1 else None
        if server is not None:
            check(f"server ({server_mode}) concurrency {level}, {best1.policy}: speedup", server.speedup, target)
    return out
