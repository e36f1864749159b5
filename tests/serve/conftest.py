"""The real server (REST + gRPC, one engine thread) on loopback with the demo pair, started once for the
package, plus a second small one with an API key and a queue bound of 2. Each runs its asyncio loop in a
background thread; tests talk to it over the network like any client."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from collab_decode.demo import checkpoint_dir
from collab_decode.engine.config import MIB, EngineConfig
from collab_decode.engine.loading import build_engine
from collab_decode.serve.requests import ServedModel
from collab_decode.serve.server import Server, ServeConfig

DEFAULT_POLICY = "entropy:0.009"  # what `collab-decode serve --pair demo` routes by
API_KEY = "test-key"
PROMPT = "Ann has 352 marbles. (a) She finds 179 more. How many marbles does Ann have now?"


def demo_engine():
    config = EngineConfig(small_kv_bytes=8 * MIB, large_kv_bytes=16 * MIB, default_policy=DEFAULT_POLICY)
    return build_engine(checkpoint_dir("small"), checkpoint_dir("large"), config=config)


@dataclass
class RunningServer:
    server: Server
    api_key: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}, without the _created series."""
        text = httpx.get(f"{self.url}/metrics").text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
            if m and "_created" not in m.group(1):
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
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


@contextlib.contextmanager
def running_server(config: ServeConfig):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()
    model = ServedModel(name="demo", small_dir=str(checkpoint_dir("small")), large_dir=str(checkpoint_dir("large")))
    server = Server(demo_engine(), model, config)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=120)
    try:
        yield RunningServer(server, config.api_key)
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


@pytest.fixture(scope="package")
def reference_engine():
    """A separate engine with the same models and config, for what the server should answer."""
    return demo_engine()
