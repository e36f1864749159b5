"""The report's checks: a server / engine ratio pairs the repeats that ran side by side."""

from __future__ import annotations

from collab_decode.bench.report import Run, add_speedups, checks, paired_ratio


def run(mode: str, policy: str, repeats: list[float], paired: list[float]) -> Run:
    return Run(mode=mode, policy=policy, family=policy, threshold=None, batch_size=1 if mode == "engine" else None,
               concurrency=None if mode == "engine" else 1, num_requests=12, accuracy=1.0, accuracy_requests=12,
               large_share=1.0 if policy == "large" else 0.0, tokens_per_s=sorted(repeats)[len(repeats) // 2],
               tokens_per_s_repeats=repeats, tokens_per_s_paired=paired, ttft_ms_p50=None, tpot_ms_p50=None,
               tpot_ms_p95=None, e2e_ms_p50=None, e2e_ms_p95=None)


def test_server_over_engine_pairs_the_side_by_side_repeats():
    """The engine's batch-1 row pools stage 2 (a quiet minute: 2000 tok/s) with its side-by-side repeats; the
    server ran only beside the latter (a busy minute for both). The ratio is taken pair by pair."""
    engine = run("engine", "large", [2000, 2000, 1500, 1300], paired=[1500, 1300])
    server = run("rest", "large", [1440, 1235], paired=[1440, 1235])
    ratio, pairs = paired_ratio(server, engine)
    assert pairs == [0.96, 0.95] and abs(ratio - 0.955) < 1e-9
    (check,) = checks([engine, server])
    assert check["value"] == 0.955 and check["ok"] and check["pairs"] == [0.96, 0.95]
    assert check["of_medians"] == round(1440 / 2000, 3)  # what pooling the medians would have said


def test_runs_without_side_by_side_repeats_compare_medians():
    engine = run("engine", "large", [1000, 1200], paired=[])
    server = run("rest", "large", [900, 1100], paired=[])
    assert paired_ratio(server, engine) == (1100 / 1200, [])


def test_the_figures_follow_the_routed_policy_the_server_ran():
    """Stage 2 chose neural:0.7 (fastest at batch 1) and stage 3 served it; stage 3's slower batch-1 repeats, pooled
    into its row, then leave `neural` ahead. The must-show figures stay with neural:0.7: its server / engine ratio
    and server speedups exist, `neural`'s do not (it never ran behind the server)."""
    rows = [run("engine", "large", [400, 400], []), run("engine", "small", [2000, 2000], []),
            run("engine", "neural:0.7", [1700, 1400, 1400], [1400]), run("engine", "neural", [1600, 1600], []),
            run("rest", "large", [380], [380]), run("rest", "neural:0.7", [1330], [1330])]
    for r in rows:
        r.large_share = {"large": 1.0, "small": 0.0}.get(r.policy, 0.03)
    rows[0].tokens_per_s_paired = [400]
    add_speedups(rows)
    assert max((r for r in rows if r.policy.startswith("neural")), key=lambda r: r.speedup).policy == "neural"
    followed = {c["what"] for c in checks(rows, routed="neural:0.7")}
    assert "server (rest) / engine tokens/s, neural:0.7, concurrency = batch 1" in followed
    assert "batch 1, neural:0.7: speedup / bound" in followed
    assert not any("neural:" not in w and "neural" in w for w in followed)
    chosen_now = {c["what"] for c in checks(rows)}  # `bench load`: the fastest now, whatever the server ran
    assert "batch 1, neural: speedup / bound" in chosen_now
    assert not any("server (rest) / engine tokens/s, neural" in w for w in chosen_now)


def test_speedup_over_bound_is_taken_pass_by_pass():
    """Pass 2 ran in a slow minute for every policy: pass by pass, speedup / bound is the same in each pass;
    from the rows' medians (pooled over passes of different speeds) it is not."""
    small = run("engine", "small", [2000, 1000, 2000], [])
    large = run("engine", "large", [400, 200, 400], [])
    routed = run("engine", "neural:0.7", [1500, 750, 1400], [])
    small.large_share, large.large_share, routed.large_share = 0.0, 1.0, 0.025
    add_speedups([small, large, routed])
    expected = [round(1500 / 400 * (400 / 2000 + 0.025), 3), round(750 / 200 * (200 / 1000 + 0.025), 3),
                round(1400 / 400 * (400 / 2000 + 0.025), 3)]
    assert routed.of_bound_repeats == expected and expected[0] == expected[1] == 0.844
    (check,) = [c for c in checks([small, large, routed], routed="neural:0.7") if "bound" in c["what"]]
    assert check["value"] == 0.844 and check["pairs"] == expected and not check["ok"]
    # the medians are pass 3's here (2000, 400, 1400); of_bound rounds speedup and bound first
    assert check["of_medians"] == routed.of_bound and abs(routed.of_bound - 1400 / 400 * (400 / 2000 + 0.025)) < 2e-3


def test_the_engines_own_step_is_checked_against_at_most_a_tenth_of_the_small_models():
    small, large = run("engine", "small", [2000], []), run("engine", "large", [400], [])
    routed = run("engine", "neural:0.7", [1500], [])
    small.large_share, large.large_share, routed.large_share = 0.0, 1.0, 0.025
    small.breakdown, routed.breakdown = {"engine_of_small_step": 0.095}, {"engine_of_small_step": 0.2}
    found = {c["what"]: c for c in checks([small, large, routed], routed="neural:0.7")}
    own = "batch 1, {}: the engine's own time per step / the small model's step"
    assert found[own.format("small")]["ok"] and found[own.format("small")]["at_most"]
    assert not found[own.format("neural:0.7")]["ok"]
