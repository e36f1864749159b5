"""The real server (REST + gRPC, one engine thread) on loopback with the demo pair, started once for the
package, plus a second small one with an API key and a queue bound of 2. Each runs its asyncio loop in a
background thread; tests talk to it over the network like any client.

`EngineGate` lets a test hold a server's engine between steps (explicit synchronisation instead of
timing), and `reference_run` runs one request on a separate engine: what the server should answer."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

import httpx
import pytest

from collab_decode.demo import checkpoint_dir
from collab_decode.engine.config import MIB, EngineConfig
from collab_decode.engine.loading import build_engine
from collab_decode.engine.sequence import Sequence
from collab_decode.sampling import SamplingParams
from collab_decode.serve.limits import Limits
from collab_decode.serve.requests import ServedModel
from collab_decode.serve.server import Server, ServeConfig

DEFAULT_POLICY = "entropy:0.009"  # the test servers' default: a routed policy, ~15% large share on the demo task
API_KEY = "test-key"
PROMPT = "Ann has 352 marbles. (a) She finds 179 more. How many marbles does Ann have now?"


def demo_engine():
    config = EngineConfig(small_kv_bytes=8 * MIB, large_kv_bytes=16 * MIB, default_policy=DEFAULT_POLICY)
    return build_engine(checkpoint_dir("small"), checkpoint_dir("large"), config=config)


@dataclass
class RunningServer:
    server: Server
    api_key: str | None
    loop: asyncio.AbstractEventLoop | None = None  # the loop the server runs on (for its coroutines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def engine(self):
        """The server's Engine. Its engine thread mutates it: tests only read counts and Sequence fields."""
        return self.server.engine.engine

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}, without the _created series."""
        text = httpx.get(f"{self.url}/metrics").text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
            if m and "_created" not in m.group(1):
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Poll /metrics until nothing is in flight and every KV block is free; returns the metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = (m["collab_decode_requests_in_flight"], m["collab_decode_requests_running"],
                    m["collab_decode_requests_waiting"], m['collab_decode_kv_blocks_used{pool="small"}'],
                    m['collab_decode_kv_blocks_used{pool="large"}'])
            if not any(busy):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: in flight, running, waiting, "
                                     f"small blocks, large blocks = {busy}")
            time.sleep(0.05)


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    """How much a /metrics series grew (a labelled series appears only once it was first counted)."""
    return after.get(key, 0.0) - before.get(key, 0.0)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds. The timeout only bounds a failure: passing never depends on speed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.01)


class EngineGate:
    """Holds a server's engine between steps, so that a test, not the clock, decides when decoding goes on.

    Installed as the engine's `step`. While paused, the engine thread skips its steps (sleeping 1 ms
    each) but still applies the adds and aborts queued meanwhile, exactly as it does between real steps.
    A request the engine holds can then never finish by itself: a test can make its client go away and
    check that the engine itself dropped the sequence, on a fast machine or a loaded one.
    """

    def __init__(self, engine):
        self.engine = engine
        self._real_step = engine.step
        self._lock = threading.Lock()
        self._pause_when: Callable | None = None
        self._paused = threading.Event()
        self.held: list[Sequence] = []  # the sequences in the engine when it paused

    def pause(self, when: Callable = lambda engine: True) -> None:
        """Pause before the first step at which `when(engine)` holds (checked on the engine thread)."""
        with self._lock:
            self._pause_when = when

    def resume(self, until: Callable | None = None) -> None:
        """Go on decoding; with `until`, pause again before the first step at which `until(engine)` holds
        (set atomically with the resume, so not one step runs unwatched)."""
        with self._lock:
            self._pause_when = until
            self._paused.clear()

    def wait_paused(self, timeout: float = 60.0) -> list[Sequence]:
        if not self._paused.wait(timeout):
            raise AssertionError(f"the engine did not reach the pause point within {timeout}s")
        return self.held

    def step(self):
        with self._lock:
            if not self._paused.is_set() and self._pause_when is not None and self._pause_when(self.engine):
                self.held = list(self.engine.seqs.values())
                self._paused.set()
            paused = self._paused.is_set()
        if paused:
            time.sleep(0.001)
            return []
        return self._real_step()


def install_gate(running: RunningServer, monkeypatch) -> EngineGate:
    """An EngineGate on a running server's engine, removed when the test ends (monkeypatch undo)."""
    gate = EngineGate(running.engine)
    monkeypatch.setattr(running.engine, "step", gate.step)
    return gate


def assert_dropped_by_engine(engine, seq: Sequence, timeout: float = 60.0) -> None:
    """The engine itself ended `seq` as aborted: finished with reason "abort", gone from the engine and
    its scheduler, no KV block left in any pool. Call while an EngineGate holds the engine, so the
    sequence cannot have finished by itself."""
    wait_until(lambda: seq.finished, f"the engine finishes sequence {seq.seq_id} (aborted)", timeout)
    assert seq.finish_reason == "abort", (seq.finish_reason, seq.num_output_tokens)
    assert seq.num_output_tokens < seq.sampling.max_tokens
    assert seq.seq_id not in engine.seqs
    assert seq not in engine.scheduler.running and seq not in engine.scheduler.waiting
    assert not any(kv.has(seq.seq_id) for kv in engine.kv.values())


def reference_run(engine, prompt: str | list[int], sampling: SamplingParams, routing: str | None = None) -> Sequence:
    """Run one request alone on `engine` (the `reference_engine`) to its end; the finished Sequence holds
    the token ids, text, provenance, logprobs and top logprobs the server should answer with."""
    prompt_ids = engine.tokenizer(prompt, add_special_tokens=True)["input_ids"] if isinstance(prompt, str) else prompt
    seq_id = engine.add_request(list(prompt_ids), sampling, routing)
    seq = engine.seqs[seq_id]
    while not seq.finished:
        engine.step()
    return seq


def chat_ids(tokenizer, content: str) -> list[int]:
    """A one-message user chat as Hugging Face tokenizes it (the rendered template, no extra special tokens)."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                              add_generation_prompt=True)["input_ids"])


def demo_model() -> ServedModel:
    return ServedModel(name="demo", small_dir=str(checkpoint_dir("small")), large_dir=str(checkpoint_dir("large")))


@contextlib.contextmanager
def running_server(config: ServeConfig, engine=None, model: ServedModel | None = None):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()
    server = Server(engine or demo_engine, model or demo_model(), config)  # a builder: run on the engine thread
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=120)
    try:
        yield RunningServer(server, config.api_key, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="package")
def server():
    with running_server(ServeConfig(port=0, grpc_port=0, max_queue=64, log_level="warning")) as s:
        yield s


@pytest.fixture(scope="package")
def guarded_server():
    """API key required, at most 2 requests in flight."""
    with running_server(ServeConfig(port=0, grpc_port=0, max_queue=2, api_key=API_KEY, log_level="warning")) as s:
        yield s


# every limit small enough for a test to pass it cheaply (tests/serve/test_limits.py, test_connections.py)
SMALL_LIMITS = Limits(max_body_bytes=64 * 1024, max_prompt_chars=2000, max_prompt_tokens=100, max_output_tokens=32,
                      max_stop=3, max_stop_chars=10, max_messages=4, header_timeout_s=1.0, idle_timeout_s=1.0)


@pytest.fixture(scope="package")
def limited_server():
    """Small limits (SMALL_LIMITS) and short connection timeouts."""
    with running_server(ServeConfig(port=0, grpc_port=0, max_queue=8, log_level="warning", limits=SMALL_LIMITS)) as s:
        yield s


@pytest.fixture
def limited_gate(limited_server, monkeypatch) -> EngineGate:
    return install_gate(limited_server, monkeypatch)


@pytest.fixture
def gate(server, monkeypatch) -> EngineGate:
    return install_gate(server, monkeypatch)


@pytest.fixture
def guarded_gate(guarded_server, monkeypatch) -> EngineGate:
    return install_gate(guarded_server, monkeypatch)


@pytest.fixture(scope="package")
def reference_engine():
    """A separate engine with the same models and config, for what the server should answer."""
    return demo_engine()
