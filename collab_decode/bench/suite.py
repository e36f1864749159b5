"""`collab-decode bench run`: the whole speed-against-accuracy report of a pair, engine and server, in one run.

Stages (progress printed as each run ends):
  1. accuracy: every policy over `--num-problems` held-out problems (engine, batched); greedy, so a
     policy's answers do not depend on the batch.
  2. batch 1, every policy, `--repeats` times (engine): the Pareto curves and the per-step breakdown.
  3. side by side at each level of `--levels` (engine batch size = server concurrency): `small`, `large`
     and the best routed policy of stage 2 (the fastest at >= 97% of large's accuracy), engine then
     server, alternating within each repeat so a busy moment of the machine hits both.
The server is `collab-decode serve` started here as a subprocess with the same engine settings; the engine
runs in this process on its main thread (the Python API as users call it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from collab_decode.bench.load import GrpcSender, RestSender, drive_server
from collab_decode.bench.measure import drive_engine
from collab_decode.bench.figures import write_report
from collab_decode.bench.report import Run, add_speedups, best_routed, make_run
from collab_decode.bench.workload import MAX_SOLUTION_TOKENS, demo_workload
from collab_decode.serve.cli import default_threads, serving_addresses, usable_cores

POLICIES = ["small", "large", "entropy:0.3", "entropy:0.6", "entropy:1.0", "entropy:1.5", "entropy:2.0",
            "step-entropy:0.6", "step-entropy:1.2", "step-entropy:2.0", "random:0.05", "random:0.1",
            "confidence:0.5", "confidence:0.8", "speculative:4"]
# with a neural router (the demo pair ships one): its calibrated threshold, and one nearer its knee
NEURAL_POLICIES = ["neural", "neural:0.7"]


def num_requests(level: int, batch1_requests: int) -> int:
    """Requests per run: enough for `level` in flight to be the steady state, not the tail."""
    return batch1_requests if level == 1 else 3 * level


class ServerProcess:
    """`collab-decode serve --small S --large L [--router NAME=DIR ...]` on free ports, until stop()."""

    def __init__(self, small: str, large: str, threads: int, routers: list[str] = (), chunk_threads: int = 0,
                 device: str = "cpu", large_wait_steps: int = 0, prefix_caching: bool = False,
                 code: str | None = None):
        """`code`: a checkout whose collab_decode the server runs (default: this one's)."""
        # no prefix cache by default, as the engine runs (measure.timed_config)
        cmd = [sys.executable, "-m", "collab_decode.cli", "serve", "--small", small, "--large", large, "--port", "0",
               "--grpc-port", "0", "--log-level", "warning", "--threads", str(threads),
               "--chunk-threads", str(chunk_threads), "--device", device, "--large-wait-steps", str(large_wait_steps),
               "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
        cmd += [arg for router in routers for arg in ("--router", router)]
        env = None if code is None else {**os.environ, "PYTHONPATH": code}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=code)
        lines = []
        for line in self.proc.stdout:  # the first line that names the ports says it is ready
            lines.append(line)
            addresses = serving_addresses(line)
            if addresses:
                self.url, self.grpc_target = addresses
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(lines[-20:]))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # drain its logs

    def cpu_seconds(self) -> dict[str, float] | None:
        """CPU seconds so far of the server's process ("api") and of its children: the engine process
        (None where /proc cannot tell)."""
        try:
            return self._cpu_seconds()
        except (OSError, ValueError, IndexError):
            return None

    def _cpu_seconds(self) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")

        def cpu(pid: int) -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

        tasks = Path(f"/proc/{self.proc.pid}/task")
        children = [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
        return {"api": cpu(self.proc.pid), "engine": sum(cpu(c) for c in children)}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


class Bench:
    """The engine (if any), the server connections and every measurement of one run; `measure` times and
    records one run. Server requests go out from one event loop, kept for the whole run."""

    def __init__(self, workload, engine=None, server: ServerProcess | None = None):
        self.engine, self.workload, self.server = engine, workload, server
        self.measurements: dict[tuple[str, int, str], list] = {}
        self.accuracy: dict[str, tuple[float, int]] = {}
        self.senders: dict[str, object] = {}
        self.loop = asyncio.new_event_loop()

    def connect(self, url: str | None, grpc_target: str | None, api_key: str | None, stream: bool) -> None:
        async def make() -> None:
            if url:
                self.senders["rest"] = RestSender(url, self.workload, api_key, stream)
            if grpc_target:
                self.senders["grpc"] = GrpcSender(grpc_target, self.workload, api_key, stream)

        self.loop.run_until_complete(make())

    def close(self) -> None:
        for sender in self.senders.values():
            self.loop.run_until_complete(sender.close())
        self.loop.close()

    def warm_up(self, policies: list[str]) -> None:
        for policy in policies:  # every decode path once, before anything is timed
            drive_engine(self.engine, self.workload, policy, 1, 1)

    def measure(self, mode: str, policy: str, level: int, count: int, label: str, pair: int | None = None) -> None:
        """`pair`: the repeat index of a side-by-side run (Run.tokens_per_s_paired); None for the others."""
        tty = sys.stdout.isatty()
        def progress(done: int) -> None:  # a counter that rewrites its line, on a terminal
            print(f"\r  {label}: {mode} {level} {policy}: {done}/{count} requests", end="", flush=True)

        if mode == "engine":
            m = drive_engine(self.engine, self.workload, policy, level, count, tty and progress)
        else:
            cpu = self.server.cpu_seconds() if self.server else None
            m = self.loop.run_until_complete(drive_server(self.senders[mode], policy, count, level, tty and progress))
            after = self.server.cpu_seconds() if cpu else None
            if after is not None:
                m.extra["server_cpu_s"] = {k: v - cpu[k] for k, v in after.items()}
        if pair is not None:
            m.extra["pair"] = pair
        self.measurements.setdefault((mode, level, policy), []).append(m)
        print(f"\r  {label}: {mode} {level} {policy}: {count} requests, {m.tokens_per_s:.0f} tok/s, "
              f"large share {m.large_share:.1%} ({m.seconds:.1f} s)", flush=True)

    def accuracy_stage(self, policies: list[str], level: int) -> None:
        n = len(self.workload)
        print(f"stage 1: accuracy of {len(policies)} policies on {n} problems (engine, batch {level})")
        for policy in policies:
            m = drive_engine(self.engine, self.workload, policy, level, n)
            self.accuracy[policy] = (m.accuracy(self.workload), n)
            print(f"  {policy}: accuracy {self.accuracy[policy][0]:.1%}, large share {m.large_share:.1%}", flush=True)

    def runs(self) -> list[Run]:
        runs = [make_run(mode, policy, level, ms, self.workload,
                         self.accuracy.get(policy) if mode == "engine" else None)
                for (mode, level, policy), ms in self.measurements.items()]
        add_speedups(runs)
        return runs


def run_suite(args: argparse.Namespace) -> None:
    import torch

    from collab_decode.demo import checkpoint_dir
    from collab_decode.engine.args import routers_from_args
    from collab_decode.bench.measure import timed_config
    from collab_decode.engine.loading import build_engine
    from collab_decode.pairs import pair_routers

    start, load_before = time.time(), os.getloadavg()
    torch.set_num_threads(args.threads)  # the server's setting too: the engine in both places is the same
    if args.router is None:  # the demo pair's shipped router, when the models are the demo pair's
        demo = (str(checkpoint_dir("small")), str(checkpoint_dir("large")))
        args.router = [f"{n}={p}" for n, p in pair_routers("demo").items()] if (args.small, args.large) == demo else []
    routers = routers_from_args(args.router)
    engine = build_engine(args.small, args.large, device=args.device, routers=routers,
                          config=timed_config(chunk_threads=args.chunk_threads, large_wait_steps=args.large_wait_steps))
    if args.policies is None:
        args.policies = POLICIES + (NEURAL_POLICIES if routers else [])
    bench = Bench(demo_workload(engine.tokenizer, args.num_problems, max_tokens=args.max_tokens), engine)
    server_modes = [] if args.no_server else ["rest"] + (["grpc"] if args.grpc else [])
    server = None
    if server_modes:
        print(f"starting the server (collab-decode serve --small {args.small} --large {args.large}) ...", flush=True)
        server = bench.server = ServerProcess(args.small, args.large, args.threads, args.router, args.chunk_threads,
                                              args.device, args.large_wait_steps)
        bench.connect(server.url, server.grpc_target if args.grpc else None, None, not args.no_stream)
    try:
        bench.warm_up(args.policies)
        bench.accuracy_stage(args.policies, max(args.levels))
        print(f"stage 2: batch 1, every policy, {args.repeats} repeats of {args.batch1_requests} requests")
        for rep in range(args.repeats):
            for policy in args.policies:
                bench.measure("engine", policy, 1, args.batch1_requests, f"[{rep + 1}/{args.repeats}]")
        best = best_routed(bench.runs(), "engine", 1)
        side = ["small", "large"] + ([best.policy] if best else []) + args.extra_policies
        print(f"stage 3: engine and server side by side at {args.levels}: {', '.join(side)}")
        side_by_side(bench, ["engine"] + server_modes, side, args)
    finally:
        bench.close()
        if server is not None:
            server.stop()
    runs = bench.runs()
    html = _answers(bench, best.policy if best else "large")
    meta = {"machine": machine(), "command": "collab-decode bench run " + " ".join(args.argv),
            "minutes": round((time.time() - start) / 60, 1), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "num_problems": args.num_problems,
            "best_routed_batch1": best.policy if best else None, "threads": args.threads,
            "chunk_threads": args.chunk_threads, "large_wait_steps": args.large_wait_steps, "device": args.device}
    write_report(Path(args.out), runs, meta, html)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.json, report.md, pareto.png, answers.html ({meta['minutes']} minutes)")


def side_by_side(bench: Bench, modes: list[str], policies: list[str], args: argparse.Namespace) -> None:
    """Every (level, policy, mode) once per repeat, modes adjacent: their ratios come from the same minutes."""
    for rep in range(args.repeats):
        for level in args.levels:
            for policy in policies:
                for mode in modes:
                    bench.measure(mode, policy, level, num_requests(level, args.batch1_requests),
                                  f"[{rep + 1}/{args.repeats}]", pair=rep)


def load_suite(args: argparse.Namespace) -> None:
    """`bench load`: a running server (REST, and gRPC if given) at each concurrency, per policy."""
    from collab_decode.engine.loading import load_tokenizer

    start, load_before = time.time(), os.getloadavg()
    bench = Bench(demo_workload(load_tokenizer(args.tokenizer), args.num_problems, max_tokens=args.max_tokens))
    bench.connect(args.url, args.grpc_target, args.api_key, not args.no_stream)
    modes = ["rest"] * bool(args.url) + ["grpc"] * bool(args.grpc_target)
    print(f"load: {', '.join(args.policies)} at concurrency {args.levels} over {', '.join(modes)}")
    try:
        side_by_side(bench, modes, args.policies, args)
    finally:
        bench.close()
    meta = {"machine": machine(), "command": "collab-decode bench load " + " ".join(args.argv),
            "minutes": round((time.time() - start) / 60, 1), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "num_problems": args.num_problems}
    write_report(Path(args.out), bench.runs(), meta)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.json, report.md")


def _answers(bench: Bench, policy: str, num: int = 6) -> str:
    from collab_decode.bench.figures import answers_html
    from collab_decode.demo.task import problems

    w = bench.workload
    gens = bench.engine.generate(w.prompt_ids[:num], w.sampling(), policy)
    questions = [p.question for p in problems("heldout", num)]
    return answers_html(bench.engine.tokenizer, [
        {"policy": policy, "question": q, "token_ids": g.token_ids, "provenance": g.provenance,
         "correct": w.is_correct(i, g.text)} for i, (q, g) in enumerate(zip(questions, gens))])


def _common_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--max-tokens", type=int, default=MAX_SOLUTION_TOKENS,
                   help=f"most output tokens per request (default: {MAX_SOLUTION_TOKENS}, room for every solution)")
    p.add_argument("--num-problems", type=int, default=200,
                   help="held-out demo problems: the accuracy set; requests cycle through them")
    p.add_argument("--batch1-requests", type=int, default=24, help="requests per run at batch size / concurrency 1")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64],
                   help="batch sizes (engine) = concurrencies (server); a run at level L > 1 sends 3L requests")
    # 3: a server / engine check is the median of its side-by-side pairs, so one busy moment of a shared machine
    # (a pair 0.1 low) cannot move it alone, as it could the mean of two
    p.add_argument("--repeats", type=int, default=3, help="repeats of every timed run (tok/s: their median)")
    p.add_argument("--no-stream", action="store_true", help="server requests unstreamed (then no TTFT)")
    p.add_argument("--out", default=out, help=f"directory for the report files (default: {out})")


def run_parser(p: argparse.ArgumentParser) -> None:
    from collab_decode.demo import checkpoint_dir

    p.add_argument("--small", default=str(checkpoint_dir("small")), help="small model (default: the demo pair's)")
    p.add_argument("--large", default=str(checkpoint_dir("large")), help="large model (default: the demo pair's)")
    p.add_argument("--router", action="append", default=None, metavar="NAME=DIR",
                   help="a neural router for the engine and the server (default: the demo pair's, demo=...)")
    p.add_argument("--policies", nargs="+", default=None,
                   help="policies of stages 1 and 2; keep small and large (speedup and bound need them) "
                        f"(default: {' '.join(POLICIES)}, and {' '.join(NEURAL_POLICIES)} with a router)")
    p.add_argument("--extra-policies", nargs="*", default=[], help="more policies for stage 3")
    p.add_argument("--no-server", action="store_true", help="the engine only")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="torch threads of this process's engine and of the server's (default: serve's, "
                        f"{default_threads()} here)")
    p.add_argument("--chunk-threads", type=int, default=usable_cores(),
                   help="torch threads of a long large-model chunk (its catch-up, a prompt) at low load, in both "
                        f"engines (default: serve's, {usable_cores()} here)")
    p.add_argument("--large-wait-steps", type=int, default=0,
                   help="most steps a routed token waits to share a large-model call, from 16 running sequences, in "
                        "both engines (serve's --large-wait-steps; default 0: none waits)")
    p.add_argument("--grpc", action="store_true", help="drive the server over gRPC too")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: both models, in this engine and the server's")
    _common_args(p, "bench_results/report")
    p.set_defaults(suite=run_suite)


def load_parser(p: argparse.ArgumentParser) -> None:
    from collab_decode.demo import checkpoint_dir

    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's REST root ('' = none)")
    p.add_argument("--tokenizer", default=str(checkpoint_dir("small")),
                   help="the served pair's tokenizer (a model directory; default: the demo pair's)")
    p.add_argument("--grpc-target", default=None, help="host:port of its gRPC API, to drive it too")
    p.add_argument("--api-key", default=os.environ.get("COLLAB_DECODE_API_KEY"),
                   help="the server's key (default: $COLLAB_DECODE_API_KEY)")
    p.add_argument("--policies", nargs="+", default=["small", "large", "entropy:1.0"],
                   help="routing per request; with small and large, speedup and bound too")
    _common_args(p, "bench_results/load")
    p.set_defaults(suite=load_suite)
