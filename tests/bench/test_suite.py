"""`collab-decode bench run` and `bench load` end to end on tiny random models: every report file is
written and every run has its fields (figures are not checked: performance is measured in benchmarks)."""

from __future__ import annotations

import json

from collab_decode.cli import main
from collab_decode.engine.config import MIB, EngineConfig
from collab_decode.engine.loading import build_engine
from collab_decode.serve.server import ServeConfig
from tests.serve.conftest import demo_model, running_server
from tests.utils import make_pair

FIELDS = {"policy", "threshold", "accuracy", "large_share", "tokens_per_s", "speedup", "bound", "ttft_ms_p50",
          "tpot_ms_p50", "tpot_ms_p95"}
TINY_RUN = ["--num-problems", "3", "--batch1-requests", "2", "--levels", "1", "2", "--repeats", "1",
            "--max-tokens", "6"]


def read_report(out) -> dict:
    report = json.loads((out / "report.json").read_text())
    for run in report["runs"]:
        assert FIELDS <= set(run) and (run["batch_size"] or run["concurrency"]), run
        assert run["tokens_per_s"] > 0 and 0 <= run["large_share"] <= 1 and run["speedup"] is not None
    assert (out / "report.md").read_text().startswith("# collab-decode benchmark")
    return report


def test_bench_run_engine_and_server(tmp_path, capsys):
    small, large = make_pair(tmp_path)
    out = tmp_path / "report"
    assert main(["bench", "run", "--small", str(small), "--large", str(large), "--grpc", "--out", str(out),
                 "--policies", "small", "large", "entropy:0.5", "step-entropy:1.0", *TINY_RUN]) == 0
    printed = capsys.readouterr().out
    assert "stage 1" in printed and "stage 3" in printed  # progress, stage by stage
    report = read_report(out)
    runs = {(r["mode"], r["batch_size"] or r["concurrency"], r["policy"]) for r in report["runs"]}
    for policy in ("small", "large", "entropy:0.5", "step-entropy:1.0"):
        assert ("engine", 1, policy) in runs
    for mode in ("engine", "rest", "grpc"):
        assert {(mode, 2, "small"), (mode, 2, "large")} <= runs
    batch1 = [r for r in report["runs"] if r["mode"] == "engine" and r["batch_size"] == 1]
    assert all(r["breakdown"]["steps_per_token"] > 0 for r in batch1)
    steps = {r["policy"]: r["breakdown"] for r in batch1}  # routing time: where a router decides, within the engine's
    assert steps["small"]["route_ms_per_step"] == steps["large"]["route_ms_per_step"] == 0
    assert 0 < steps["entropy:0.5"]["route_ms_per_step"] <= steps["entropy:0.5"]["engine_ms_per_step"]
    assert "| of it routing |" in (out / "report.md").read_text()
    assert all((r["bound"] is None) == (r["policy"] == "large") for r in batch1)  # bound: of routing
    # stage 3's repeats are paired across modes (server / engine ratios pair them); stage 2's are not
    assert all(len(r["tokens_per_s_paired"]) == 1 for r in report["runs"] if (r["batch_size"] or 0) != 1)
    side = {"small", "large", report["meta"]["best_routed_batch1"]}
    assert {r["policy"] for r in batch1 if r["tokens_per_s_paired"]} == side
    assert all(len(c["pairs"]) == 1 for c in report["checks"] if c["what"].startswith("server"))
    # speedup / bound, pass by pass: the best routed policy's stage-2 repeat and its stage-3 one, each against
    # the small and large repeats of its own pass
    bound_checks = [c for c in report["checks"] if c["what"].endswith("speedup / bound")]
    assert all(len(c["pairs"]) == 2 for c in bound_checks)
    assert (out / "pareto.png").stat().st_size > 0 and "<span class='" in (out / "answers.html").read_text()


def test_bench_load_drives_a_running_server(tmp_path):
    small, large = make_pair(tmp_path)
    config = EngineConfig(small_kv_bytes=4 * MIB, large_kv_bytes=4 * MIB)
    serve = ServeConfig(port=0, grpc_port=0, log_level="warning")
    with running_server(serve, lambda: build_engine(small, large, config=config), demo_model()) as server:
        out = tmp_path / "load"
        assert main(["bench", "load", "--url", server.url, "--grpc-target", server.grpc_target, "--out", str(out),
                     "--policies", "small", "large", *TINY_RUN]) == 0
    report = read_report(out)
    assert {(r["mode"], r["concurrency"]) for r in report["runs"]} == {(m, c) for m in ("rest", "grpc") for c in (1, 2)}
    assert all(r["ttft_ms_p50"] is not None and r["client_cpu_share"] is not None for r in report["runs"])
