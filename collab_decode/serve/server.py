"""One process serving REST (uvicorn) and gRPC (grpc.aio) on one event loop over one engine thread (which
`serve` makes the client of an engine process: serve/engine_core.py).

Shutdown (SIGTERM or SIGINT; a second one skips the rest of the drain): drain, then stop.
    drain: new requests get 503 / UNAVAILABLE and /health 503 "draining", while those in flight finish,
           for up to drain_timeout_s
    stop:  the engine stops, failing what is left: an open SSE stream ends with an error event and
           `data: [DONE]`, a gRPC call with UNAVAILABLE; then both servers close their connections
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import signal
import socket
from dataclasses import dataclass, field
from typing import Callable

import uvicorn

from collab_decode.serve.async_engine import AsyncEngine
from collab_decode.serve.grpc_server import CollabDecodeService, start_grpc_server
from collab_decode.serve.http_guard import header_timeout_protocol
from collab_decode.serve.limits import Limits, PromptTokenizer
from collab_decode.serve.openai_api import create_app
from collab_decode.serve.requests import ServedModel
from collab_decode.serve.waiting import wait_for


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # interface both servers listen on
    port: int = 8000  # REST port; 0 = any free port
    grpc_port: int = 50051  # gRPC port; 0 = any free port
    api_key: str | None = None  # when set, every /v1 and gRPC generation call must send it
    max_queue: int = 256  # most requests in flight (queued + running) before 429 / RESOURCE_EXHAUSTED
    log_level: str = "info"  # uvicorn's access and error logs
    shutdown_timeout_s: float = 5.0  # how long a shutdown waits for open connections, after the drain
    drain_timeout_s: float = field(default=30.0, metadata={"help": (
        "on SIGTERM, how long requests in flight may go on finishing (new ones get 503) before open streams "
        "are ended with an error"), "type": float})
    limits: Limits = field(default_factory=Limits)  # what one request may ask (serve/limits.py)

    def __post_init__(self):
        for name in ("port", "grpc_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # Server.run_until_signal handles signals for both servers


class Server:
    """Both APIs over one AsyncEngine. `await start()`, then `await stop()` (or `run_until_signal()`).

    `engine`: an Engine, or a function that builds one on the engine thread (so that thread does all of
    the models' torch work; `serve` passes one). `start()` returns once it is built and both APIs listen."""

    def __init__(self, engine, model: ServedModel, config: ServeConfig | None = None):
        self.config = config or ServeConfig()
        self.model = model
        self.engine = AsyncEngine(engine, self.config.max_queue, request_timeout_s=self.config.limits.request_timeout_s)
        self.prompts: PromptTokenizer | None = None  # tokenizes prompts for both APIs, once started
        self.port: int | None = None  # bound REST port, once started
        self.grpc_port: int | None = None  # bound gRPC port, once started
        self._grpc = None
        self._uvicorn: _Uvicorn | None = None
        self._uvicorn_task: asyncio.Task | None = None
        self._cut_drain = asyncio.Event()  # a second signal: stop waiting for the requests in flight

    async def start(self) -> None:
        cfg = self.config
        sock = _listen(cfg.host, cfg.port)  # a port in use fails now, before the models load
        self.engine.start()
        try:
            await self.engine.wait_ready()
        except BaseException:
            sock.close()
            raise
        tokenizer = copy.deepcopy(self.engine.engine.tokenizer)  # the loop's own: the engine thread decodes too
        self.port = sock.getsockname()[1]
        self.prompts = PromptTokenizer(tokenizer)
        app = create_app(self.engine, self.model, tokenizer, cfg.api_key, cfg.limits, self.prompts)
        self._service = CollabDecodeService(self.engine, self.model, tokenizer, cfg.api_key, cfg.limits, self.prompts)
        self._grpc, self.grpc_port = await start_grpc_server(self._service, cfg.host, cfg.grpc_port,
                                                             cfg.limits.max_body_bytes)
        self._uvicorn = _Uvicorn(uvicorn.Config(app, log_level=cfg.log_level, lifespan="off",
                                                timeout_graceful_shutdown=cfg.shutdown_timeout_s,
                                                timeout_keep_alive=cfg.limits.idle_timeout_s,
                                                http=header_timeout_protocol(cfg.limits.header_timeout_s)))
        self._uvicorn_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._uvicorn_task.done():
                self._uvicorn_task.result()
                raise RuntimeError("the REST server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain for up to `drain_timeout_s` (default: the config's), then stop (see the module docstring)."""
        await self.drain(self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        await self.engine.stop()  # fails what is left: streams end with an error event, gRPC with UNAVAILABLE
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            await self._uvicorn_task
        if self._grpc is not None:
            await self._grpc.stop(grace=self.config.shutdown_timeout_s)
        if self.prompts is not None:
            self.prompts.close()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests (503, UNAVAILABLE; /health and gRPC health say so) and wait up to `timeout_s`
        for those in flight to finish (or until a second signal)."""
        self.engine.draining = True
        if self._grpc is not None:
            await self._service.health.enter_graceful_shutdown()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.engine.num_in_flight and not self._cut_drain.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self._cut_drain.wait(), min(left, 0.05))

    async def run_until_signal(self, announce: Callable[["Server"], None] | None = None) -> None:
        """Serve until SIGINT or SIGTERM, then drain and stop; `announce(self)` once listening."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                self._cut_drain.set()  # a second signal: end the drain now
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await self.start()
            if announce is not None:
                announce(self)
            await stop.wait()
        finally:
            await self.stop()


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket for the REST server (bind errors surface here, not inside uvicorn)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on a connection only when its socket says TCP.
    # Without it Nagle's algorithm holds a response's body until the client acks its headers: ~40 ms each.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for REST: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock
