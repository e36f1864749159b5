"""Graceful drain (serve/server.py): new requests get 503 / UNAVAILABLE while those in flight finish, up to
the drain timeout; then each open stream ends with an error event and `data: [DONE]` (gRPC: UNAVAILABLE),
and `collab-decode serve` exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from collab_decode.serve.server import ServeConfig
from tests.serve.conftest import PROMPT, install_gate, running_server, wait_until
from tests.serve.test_errors import assert_openai_error

LONG = {"model": "demo", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}


def decoding(engine) -> bool:
    return any(s.num_output_tokens >= 1 for s in engine.seqs.values())


class Stream(threading.Thread):
    """An SSE request read to its end on a thread: `lines` are its non-empty lines."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.opened = threading.Event()
        self.lines: list[str] = []
        self.status: int | None = None

    def run(self):
        with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=120) as r:
            self.status = r.status_code
            self.opened.set()
            self.lines = [line for line in r.iter_lines() if line]

    def events(self) -> list[dict]:
        return [json.loads(line.removeprefix("data: ")) for line in self.lines if line != "data: [DONE]"]


def start_stopping(running, **kwargs):
    return asyncio.run_coroutine_threadsafe(running.server.stop(**kwargs), running.loop)


def test_drain_refuses_new_requests_and_lets_those_in_flight_finish(monkeypatch):
    config = ServeConfig(port=0, grpc_port=0, log_level="warning", drain_timeout_s=120)
    with running_server(config) as s:
        gate = install_gate(s, monkeypatch)
        gate.pause(decoding)  # the stream cannot finish until the test says so
        stream = Stream(s.url, LONG)
        stream.start()
        gate.wait_paused()
        stopping = start_stopping(s)
        wait_until(lambda: s.server.engine.draining, "the server drains")
        error = assert_openai_error(httpx.post(f"{s.url}/v1/completions", json={**LONG, "stream": False}), 503)
        assert error["code"] == "server_shutting_down"
        health = httpx.get(f"{s.url}/health")
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        with grpc.insecure_channel(s.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.CollabDecodeStub(channel).Generate(pb.GenerateRequest(text=PROMPT), timeout=60)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stopping.done() and stream.is_alive()  # the stream in flight holds the shutdown
        gate.resume()
        stream.join(timeout=120)
        stopping.result(timeout=120)
    events = stream.events()
    assert stream.lines[-1] == "data: [DONE]" and not any("error" in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == LONG["max_tokens"]


def test_past_the_drain_timeout_open_streams_end_with_an_error_and_done(monkeypatch):
    config = ServeConfig(port=0, grpc_port=0, log_level="warning", drain_timeout_s=0.5)
    with running_server(config) as s:
        gate = install_gate(s, monkeypatch)
        gate.pause(lambda engine: len(engine.seqs) == 2 and decoding(engine))
        stream = Stream(s.url, LONG)
        stream.start()
        with grpc.insecure_channel(s.grpc_target) as channel:
            call = pb_grpc.CollabDecodeStub(channel).GenerateStream(pb.GenerateRequest(
                text=PROMPT, sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)), timeout=120)
            gate.wait_paused()
            stopping = start_stopping(s)
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
        stream.join(timeout=120)
        stopping.result(timeout=120)
    assert stream.lines[-1] == "data: [DONE]"
    error = stream.events()[-1]["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"


def test_serve_process_drains_on_sigterm_and_exits_0():
    """A real `collab-decode serve`: one sequence at a time and many long streams, so most are still queued
    when SIGTERM comes; after the drain timeout each one ends with an error event and [DONE]."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "collab_decode.cli", "serve", "--port", "0", "--grpc-port", "0",
                             "--log-level", "warning", "--max-num-seqs", "1", "--drain-timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"REST http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}"
        streams = [Stream(url, {**LONG, "max_tokens": 450}) for _ in range(32)]
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.opened.wait(120) and stream.status == 200
        proc.send_signal(signal.SIGTERM)
        for stream in streams:
            stream.join(timeout=120)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cut = 0
    for stream in streams:
        assert stream.lines[-1] == "data: [DONE]", stream.lines[-3:]  # never a broken chunked transfer
        last = stream.events()[-1]
        if "error" in last:
            assert last["error"]["code"] == "server_shutting_down"
            cut += 1
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert cut >= 1  # 32 x 450 tokens, one sequence at a time, do not all finish within a 1 s drain
