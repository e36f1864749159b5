"""The report's checks: a server / engine ratio pairs the repeats that ran side by side."""

from __future__ import annotations

from collab_decode.bench.report import Run, checks, paired_ratio


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
