#!/usr/bin/env python
"""A bounded soak of a real `collab-decode serve --pair demo` (the engine in its own process).

N clients, each a thread, send requests back to back for a while: REST completions and chat, gRPC unary
and streaming, streaming and not, routed by a mix of policies (small, large, entropy, step-entropy,
speculative, random, neural when the server has a router), a share of streams cancelled mid-way (the
client goes away) and a share of hostile requests (bad parameters, wrong types, malformed JSON, an
oversized body, invalid Unicode; garbage protobuf) that must each get their 4xx / gRPC status.

Prints the figures (requests by kind, unexpected failures, p50/p99 latency of the innocent requests,
RSS of the server and engine processes at start and end, KV blocks in use once idle) and exits 1 on any
unexpected outcome: an innocent request that failed, a hostile one not answered as documented, KV blocks
still in use once the server is idle, an exception in the server's log. Speed is printed, never judged.

    .venv/bin/python tools/soak.py --minutes 10 --clients 32     # the long form (make soak)
    .venv/bin/python tools/soak.py --seconds 60 --clients 8      # CI's short form (tests/serve/test_soak.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from collab_decode.demo.task import make_problem
from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.cli import serving_addresses
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc

MAX_BODY_BYTES = 128 * 1024  # the soak server's body limit: an oversized body is cheap to send
MAX_OUTPUT_TOKENS = 64  # the soak server's max_tokens cap
POLICIES = ["small", "large", "entropy:0.3", "step-entropy:1.0", "speculative:4", "random:0.2", "neural"]
REQUEST_TIMEOUT_S = 120.0  # a request not answered by then counts as stuck (a failure)


@dataclass
class Result:
    kind: str  # e.g. "rest-completion-stream", "hostile:bad temperature"
    ok: bool  # answered as expected
    latency_s: float
    detail: str = ""  # what went wrong, when not ok
    cancelled: bool = False  # the client went away on purpose


@dataclass
class Soak:
    url: str
    grpc_target: str
    policies: list[str]
    hostile_share: float = 0.15
    cancel_share: float = 0.15
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, index: int, deadline: float) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as http, \
                grpc.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.CollabDecodeStub(channel)
            while time.monotonic() < deadline:
                start = time.perf_counter()
                if rng.random() < self.hostile_share:
                    name, send = rng.choice(HOSTILE)
                    kind = f"hostile:{name}"
                    try:
                        ok, detail = send(http, channel)
                    except Exception as e:  # a transport error is an unexpected answer too
                        ok, detail = False, f"{type(e).__name__}: {e}"
                    result = Result(kind, ok, time.perf_counter() - start, detail)
                else:
                    result = self.innocent(rng, http, stub, start)
                with self.lock:
                    self.results.append(result)

    def innocent(self, rng: random.Random, http: httpx.Client, stub, start: float) -> Result:
        api = rng.choice(["rest-completion", "rest-chat", "grpc"])
        stream = rng.random() < 0.5
        cancel = stream and rng.random() < self.cancel_share
        question = make_problem(rng.randrange(10**9) + 2 * 10**9).question
        sampling = {"max_tokens": rng.randint(8, MAX_OUTPUT_TOKENS), "temperature": rng.choice([0.0, 0.7]),
                    "seed": rng.randrange(10**6)}
        n = 2 if stream and rng.random() < 0.2 else 1
        policy = rng.choice(self.policies)
        kind = f"{api}{'-stream' if stream else ''}{'-cancel' if cancel else ''}"
        try:
            if api == "grpc":
                detail = _grpc_generate(stub, question, sampling, policy, stream, n, cancel and rng.randint(1, 4))
            else:
                detail = _rest_generate(http, api, question, sampling, policy, stream, n, cancel and rng.randint(1, 4))
        except Exception as e:
            detail = f"{type(e).__name__}: {e}"
        return Result(kind, not detail, time.perf_counter() - start, f"{policy}: {detail}" if detail else "",
                      cancelled=cancel)


# ---- innocent requests: each returns "" when answered as it should be, else what was wrong ----------
def _rest_generate(http: httpx.Client, api: str, question: str, sampling: dict, policy: str, stream: bool,
                   n: int, cancel_after: int | bool) -> str:
    if api == "rest-chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": question}]}
    else:
        path, body = "/v1/completions", {"prompt": question}
    body.update(model="demo", routing=policy, stream=stream, n=n, **sampling)
    if not stream:
        r = http.post(path, json=body)
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:300]}"
        choices = r.json()["choices"]
        if len(choices) != n or any(c["finish_reason"] not in ("stop", "length") for c in choices):
            return f"bad choices: {r.text[:300]}"
        return ""
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.read()[:300]!r}"
        events, finished = [], 0
        for line in r.iter_lines():
            if not line:
                continue
            events.append(line)
            if line != "data: [DONE]":
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return f"error event: {line[:300]}"
                finished += sum(c.get("finish_reason") in ("stop", "length") for c in chunk["choices"])
            if cancel_after and len(events) >= cancel_after:
                return ""  # leaving the block closes the connection mid-stream
        if events[-1:] != ["data: [DONE]"] or finished != n:
            return f"stream ended without [DONE] or a finish per choice: {events[-2:]}"
    return ""


def _grpc_generate(stub, question: str, sampling: dict, policy: str, stream: bool, n: int,
                   cancel_after: int | bool) -> str:
    request = pb.GenerateRequest(model="demo", chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=question)]),
                                 sampling=pb.SamplingParams(**sampling), routing=policy, n=n if stream else 1)
    if not stream:
        response = stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
        return "" if response.finish_reason in ("stop", "length") else f"finish_reason {response.finish_reason!r}"
    call = stub.GenerateStream(request, timeout=REQUEST_TIMEOUT_S)
    finished = 0
    for i, message in enumerate(call, 1):
        finished += message.finish_reason in ("stop", "length")
        if cancel_after and i >= cancel_after:
            call.cancel()
            return ""
    return "" if finished == n else f"{finished} of {n} choices finished"


# ---- hostile requests: each (http, channel) -> (answered as documented, what it got) ------------------
def _rest(status: int, body=None, content: bytes | None = None, path: str = "/v1/completions"):
    def send(http: httpx.Client, channel) -> tuple[bool, str]:
        if content is not None:
            r = http.post(path, content=content, headers={"content-type": "application/json"})
        else:
            r = http.post(path, json={"model": "demo", "prompt": "Ann has 3 apples.", "max_tokens": 4, **body})
        error = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
        ok = r.status_code == status and isinstance(error, dict) and "message" in error
        return ok, "" if ok else f"want HTTP {status}, got {r.status_code}: {r.text[:200]}"
    return send


def _grpc(want: grpc.StatusCode, request: pb.GenerateRequest | bytes):
    def send(http: httpx.Client, channel) -> tuple[bool, str]:
        method = "/collab_decode.v1.CollabDecode/Generate"
        call = channel.unary_unary(method) if isinstance(request, bytes) else \
            channel.unary_unary(method, pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString)
        try:
            call(request, timeout=REQUEST_TIMEOUT_S)
        except grpc.RpcError as e:
            return e.code() == want, "" if e.code() == want else f"want {want.name}, got {e.code().name}: {e.details()}"
        return False, f"want {want.name}, got OK"
    return send


_TEXT = "Ann has 3 apples."
_BAD = grpc.StatusCode.INVALID_ARGUMENT
HOSTILE = [
    ("bad temperature", _rest(400, {"temperature": -1})),
    ("bad top_p", _rest(400, {"top_p": 1.5})),
    ("negative max_tokens", _rest(400, {"max_tokens": -5})),
    ("max_tokens over the cap", _rest(400, {"max_tokens": MAX_OUTPUT_TOKENS + 1})),
    ("unknown policy", _rest(400, {"routing": "bogus:1"})),
    ("a path as a router", _rest(400, {"routing": "neural:/etc/passwd"})),
    ("seed past 64 bits", _rest(400, {"seed": 2**70})),
    ("n past its bound", _rest(400, {"n": 100000})),
    ("wrong type", _rest(400, {"prompt": 5})),
    ("token id out of range", _rest(400, {"prompt": [10**9]})),
    ("unknown model", _rest(400, {"model": "gpt-9"})),
    ("too many stop strings", _rest(400, {"stop": ["x"] * 100})),
    ("NaN temperature", _rest(400, content=b'{"model":"demo","prompt":"a","temperature":NaN}')),
    ("malformed JSON", _rest(400, content=b'{"model": "demo", "prompt": ')),
    ("oversized body", _rest(413, content=b'{"prompt": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}')),
    ("invalid UTF-8", _rest(400, content=b'{"model":"demo","prompt":"\xff\xfe"}')),
    ("lone surrogate", _rest(400, content=b'{"model":"demo","prompt":"a\\ud800b"}')),
    ("chat without messages", _rest(400, {"messages": []}, path="/v1/chat/completions")),
    ("grpc NaN temperature", _grpc(_BAD, pb.GenerateRequest(text=_TEXT, sampling=pb.SamplingParams(
        temperature=float("nan"))))),
    ("grpc token id out of range", _grpc(_BAD, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**31 - 1])))),
    ("grpc negative max_tokens", _grpc(_BAD, pb.GenerateRequest(text=_TEXT, sampling=pb.SamplingParams(
        max_tokens=-1)))),
    ("grpc unknown policy", _grpc(_BAD, pb.GenerateRequest(text=_TEXT, routing="bogus"))),
    ("grpc no prompt", _grpc(_BAD, pb.GenerateRequest())),
    ("grpc garbage bytes", _grpc(_BAD, b"\xff\xff\xff\xff\x0f\x12")),
]


# ---- the server and its processes ---------------------------------------------------------------
class ServeProcess:
    """`collab-decode serve --pair demo` on free ports, its output in a log file."""

    def __init__(self, extra_args: list[str]):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="collab-decode-soak-", suffix=".log", delete=False)
        args = [sys.executable, "-m", "collab_decode.cli", "serve", "--pair", "demo", "--port", "0", "--grpc-port",
                "0", "--log-level", "warning", "--max-body-bytes", str(MAX_BODY_BYTES), "--max-output-tokens",
                str(MAX_OUTPUT_TOKENS), *extra_args]
        self.command = " ".join(args[2:])
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not (addresses := serving_addresses(Path(self.log.name).read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.2)
        self.url, self.grpc_target = addresses

    def engine_pid(self) -> int | None:
        """The engine process: the server's child that multiprocessing spawned (not its resource tracker)."""
        for child in _children(self.proc.pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                return child
        return None

    def rss_mib(self) -> dict[str, float]:
        return {"api": _rss_mib(self.proc.pid), "engine": _rss_mib(self.engine_pid())}

    def stop(self) -> str:
        """SIGTERM, wait; returns the server's output."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        text = Path(self.log.name).read_text()
        os.unlink(self.log.name)
        return text


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rss_mib(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def kv_blocks(url: str, timeout_s: float = 120.0) -> dict[str, tuple[int, int]]:
    """Once nothing is in flight (or after timeout_s): pool -> (blocks used, blocks in all), from /metrics."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        used = {m.group(1): int(float(m.group(2))) for m in re.finditer(
            r'^collab_decode_kv_blocks_used\{pool="(\w+)"\} (\S+)$', text, re.M)}
        total = {m.group(1): int(float(m.group(2))) for m in re.finditer(
            r'^collab_decode_kv_blocks_total\{pool="(\w+)"\} (\S+)$', text, re.M)}
        in_flight = re.search(r"^collab_decode_requests_in_flight (\S+)$", text, re.M)
        idle = not any(used.values()) and in_flight is not None and float(in_flight.group(1)) == 0
        if idle or time.monotonic() > deadline:
            return {pool: (used[pool], total[pool]) for pool in used}
        time.sleep(0.2)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# ---- the run --------------------------------------------------------------------------------------
def run(seconds: float, num_clients: int, hostile_share: float, cancel_share: float, extra_args: list[str]) -> dict:
    server = ServeProcess(extra_args)
    try:
        probe = httpx.post(f"{server.url}/v1/completions", timeout=REQUEST_TIMEOUT_S, json={
            "model": "demo", "prompt": "Ann has 3 apples.", "max_tokens": 2, "routing": "neural"})
        policies = POLICIES if probe.status_code == 200 else [p for p in POLICIES if p != "neural"]
        soak = Soak(server.url, server.grpc_target, policies, hostile_share, cancel_share)
        warm = random.Random(-1)  # every policy once through each API before RSS is read
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http, \
                grpc.insecure_channel(server.grpc_target) as channel:
            for policy in policies:
                for api in ("rest-completion", "rest-chat"):
                    _rest_generate(http, api, "Ann has 3 apples.", {"max_tokens": 8}, policy, warm.random() < .5, 1, 0)
                _grpc_generate(pb_grpc.CollabDecodeStub(channel), "Ann has 3 apples.", {"max_tokens": 8}, policy,
                               True, 1, 0)
        kv_blocks(server.url)
        rss_start = server.rss_mib()
        deadline = time.monotonic() + seconds
        clients = [threading.Thread(target=soak.client, args=(i, deadline), daemon=True) for i in range(num_clients)]
        started = time.perf_counter()
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=seconds + 2 * REQUEST_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        stuck = sum(c.is_alive() for c in clients)
        blocks = kv_blocks(server.url)
        rss_end = server.rss_mib()
        healthy = httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    finally:
        log = server.stop()
    return summarize(soak.results, elapsed, num_clients, stuck, blocks, rss_start, rss_end, healthy, log,
                     policies, server.command)


def summarize(results: list[Result], elapsed: float, num_clients: int, stuck: int, blocks: dict, rss_start: dict,
              rss_end: dict, healthy: bool, log: str, policies: list[str], command: str) -> dict:
    failures = [r for r in results if not r.ok]
    innocent = [r for r in results if not r.kind.startswith("hostile:")]
    latencies = [r.latency_s for r in innocent if r.ok and not r.cancelled]
    log_errors = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line
                  or line.startswith("ERROR")]
    by_kind: dict[str, int] = {}
    for r in results:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    return {
        "server": command, "policies": policies, "clients": num_clients, "seconds": round(elapsed, 1),
        "requests": len(results), "innocent": len(innocent), "cancelled": sum(r.cancelled for r in results),
        "hostile": len(results) - len(innocent), "failures": len(failures),
        "failure_examples": [f"{r.kind}: {r.detail}" for r in failures[:10]], "stuck_clients": stuck,
        "latency_p50_s": round(_percentile(latencies, 0.5), 3), "latency_p99_s": round(_percentile(latencies, 0.99), 3),
        "rss_start_mib": {k: round(v, 1) for k, v in rss_start.items()},
        "rss_end_mib": {k: round(v, 1) for k, v in rss_end.items()},
        "kv_blocks_used_at_end": {pool: used for pool, (used, _) in blocks.items()},
        "kv_blocks_total": {pool: total for pool, (_, total) in blocks.items()},
        "healthy_at_end": healthy, "server_log_errors": log_errors[:10], "by_kind": dict(sorted(by_kind.items())),
    }


def passed(summary: dict) -> bool:
    return (summary["failures"] == 0 and summary["stuck_clients"] == 0 and summary["healthy_at_end"]
            and not any(summary["kv_blocks_used_at_end"].values()) and not summary["server_log_errors"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long the clients send requests")
    length.add_argument("--seconds", type=float, help="the same, in seconds (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--hostile-share", type=float, default=0.15, help="share of hostile requests (default 0.15)")
    parser.add_argument("--cancel-share", type=float, default=0.15,
                        help="share of streams the client leaves mid-way (default 0.15)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("serve_args", nargs="*", help="more `collab-decode serve` arguments (after --)")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60 if args.minutes is not None else (args.seconds or 60.0)
    summary = run(seconds, args.clients, args.hostile_share, args.cancel_share, args.serve_args)
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    ok = passed(summary)
    print("soak: PASS" if ok else "soak: FAIL (see failures, kv_blocks_used_at_end, server_log_errors)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
