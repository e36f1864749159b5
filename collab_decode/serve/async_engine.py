"""AsyncEngine: asyncio tasks share one Engine that a single engine thread steps.

Data flow:

    asyncio task: await add_request(...) --("add", stream)--> commands (list under a Condition)
                  stream.abort()         --("abort", stream)-->        |
    engine thread: between steps, apply commands (Engine.add_request / Engine.abort); step while
                   there is work, sleep on the Condition otherwise
                   Engine.step() -> RequestOutput per request -> Delta (a snapshot: the Sequence keeps
                   changing on this thread) -> loop.call_soon_threadsafe -> the stream's asyncio.Queue
    asyncio task: async for delta in stream (ends after the delta with finished=True, or raises
                  RequestFailed for a request the engine ended with an error, e.g. the large model's
                  endpoint is down)

The engine thread also builds the Engine when given a function that builds one, so all of the models'
torch work (load, warm-up, steps) happens on that one thread: on a CPU, torch ops from a second thread
run ~3x slower once another thread has run any (docs/benchmarks.md). `serve` goes further and gives an
EngineProcess: the engine thread then drives an engine in a process of its own (serve/engine_core.py),
sending each request as it comes and reading the engine process's answer with a later step's outputs.
The Engine is not thread-safe: only the engine thread touches it. add_request resolves only once the
engine has accepted the request, so a bad request raises ValueError in the caller (HTTP 400, gRPC
INVALID_ARGUMENT) before any output, and the engine thread carries on. At most `max_queue` requests
are in flight; past that add_request raises EngineBusy (HTTP 429, gRPC RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

from collab_decode.engine.output import INTERNAL_ERROR, MODEL_ERROR
from collab_decode.routing import RoutingSpec
from collab_decode.sampling import SamplingParams
from collab_decode.serve.engine_core import EngineCoreClient, EngineCoreDied
from collab_decode.serve.metrics import ServerMetrics
from collab_decode.serve.waiting import wait_for

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """The server holds max_queue requests already; the caller should retry later."""


class RequestFailed(RuntimeError):
    """The request ended without finishing: it failed in the engine on its own (the server serves everyone
    else) or the engine stopped. `code`: the error body's machine-readable kind. Its own fault of the server
    (`server_fault`: a model's logits were NaN, a router raised on it) is HTTP 500, gRPC INTERNAL; a model
    that could not run it (the large model's endpoint is down) or a stopped engine, HTTP 503, gRPC UNAVAILABLE."""

    code: str | None = None

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def server_fault(self) -> bool:
        """The server could not compute this request; asking again will not help."""
        return self.code in (MODEL_ERROR, INTERNAL_ERROR)


class EngineStopped(RequestFailed):
    """The engine thread stopped (shutdown or a failed step) before the request finished, or the server is
    draining and takes no new request (then `code` is SHUTTING_DOWN)."""


SHUTTING_DOWN = "server_shutting_down"


class RequestTimedOut(RequestFailed):
    """The request ran past the server's request timeout; it was aborted (its blocks are free).
    HTTP 504, gRPC DEADLINE_EXCEEDED; a stream ends with an error event."""

    code = "request_timeout"


@dataclass
class Delta:
    """What one engine step added to one request (built on the engine thread, read on the loop)."""

    token_ids: list[int]  # tokens committed this step
    text: str  # text they added (held back while a stop string may be partial)
    provenance: list[str]  # "small" / "large" per new token
    logprobs: list[float]  # chosen-token logprob per new token (empty unless asked)
    top_logprobs: list[list[tuple[int, float]]]  # per new token: (token id, logprob) of the top n, if asked
    prompt_logprobs: list | None  # Sequence.prompt_logprobs, on a request's first delta if asked; else None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" at the end
    num_prompt_tokens: int
    stats: dict  # SequenceStats.as_dict(): small_tokens, large_tokens, large_share, large_calls, ...
    queue_time_s: float | None = None  # seconds the engine held it before its first admission (None: not yet)


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    routing: RoutingSpec | str | None  # None: the engine's default policy
    accepted: asyncio.Future  # resolves when the engine has queued the request (or raises its error)
    outputs: asyncio.Queue  # Delta | Exception (RequestFailed), in order
    closed: bool = False  # loop side: finished, failed or aborted (its admission slot is free again)
    seq_id: int | None = None  # engine thread only
    num_sent: int = 0  # output tokens already delivered (engine thread only)
    arrival: float = field(default_factory=time.perf_counter)


class RequestStream:
    """One request's outputs: `async for delta in stream`; leaving `async with stream` early aborts it,
    and so does dropping a stream that was never read to the end."""

    def __init__(self, engine: "AsyncEngine", request: _Request):
        self._engine = engine
        self._request = request
        self._first_token_at: float | None = None  # (for metrics)
        self._num_tokens = 0
        weakref.finalize(self, engine._abandon, request)

    @property
    def finished(self) -> bool:
        return self._request.closed

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Delta:
        if self.finished:
            raise StopAsyncIteration
        item = await self._next_output()
        if isinstance(item, Exception):
            self._engine._close(self._request, "error")  # a timeout closed it as "timeout" already
            raise item
        self._observe(item)
        if item.finished:
            self._engine._close(self._request, item.finish_reason or "stop")
        return item

    async def _next_output(self) -> Delta | Exception:
        """The next delta (or error), or RequestTimedOut once the request has run past the server's timeout
        (it is aborted then: the engine frees its blocks before its next step)."""
        timeout_s = self._engine.request_timeout_s
        if not timeout_s:
            return await self._request.outputs.get()
        left = self._request.arrival + timeout_s - time.perf_counter()
        try:  # not asyncio.wait_for: before Python 3.12 it can drop the cancel of a client gone (waiting.py)
            return await wait_for(self._request.outputs.get(), left)
        except asyncio.TimeoutError:
            self._engine._abort_request(self._request, outcome="timeout")
            return RequestTimedOut(f"the request ran longer than this server's limit ({timeout_s:g} s)")

    def _observe(self, delta: Delta) -> None:
        metrics = self._engine.metrics
        metrics.count_tokens(delta.provenance)
        now = time.perf_counter()
        elapsed = now - self._request.arrival
        if delta.token_ids and self._first_token_at is None:
            self._first_token_at = now
            metrics.ttft.observe(elapsed)
        self._num_tokens += len(delta.token_ids)
        if delta.finished:
            metrics.e2e.observe(elapsed)
            if self._num_tokens > 1:
                metrics.tpot.observe((now - self._first_token_at) / (self._num_tokens - 1))
            if delta.queue_time_s is not None:
                metrics.queue_time.observe(delta.queue_time_s)
            metrics.prompt_tokens.inc(delta.num_prompt_tokens)
            metrics.request_large_share.observe(delta.stats["large_share"])
            metrics.large_calls.inc(delta.stats["large_calls"])
            metrics.large_waits.inc(delta.stats["large_waits"])

    def abort(self) -> None:
        """Stop the request now (a client went away); the engine frees its blocks before its next step."""
        self._engine._abort_request(self._request)

    async def collect(self) -> list[Delta]:
        """All deltas to the end (for non-streaming calls)."""
        return [delta async for delta in self]

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()


class AsyncEngine:
    def __init__(self, engine, max_queue: int = 256, metrics: ServerMetrics | None = None,
                 request_timeout_s: float = 0.0):
        """`engine`: an Engine, or a function that builds one; the engine thread calls it (see above).
        Either way `self.engine` is the Engine once `wait_ready()` returned. A request still unfinished
        `request_timeout_s` after it arrived is aborted and its stream raises RequestTimedOut (0: never)."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._build: Callable = engine if callable(engine) else (lambda: engine)
        self.engine = None if callable(engine) else engine
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.draining = False  # set when the server drains: new requests are refused (EngineStopped)
        self.metrics = metrics or ServerMetrics()
        self.num_in_flight = 0  # loop side only
        self._commands: list[tuple[str, _Request]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._active: dict[int, _Request] = {}  # seq_id -> request; engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future | None = None  # set once the engine thread holds a built Engine

    # ---- loop side ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (which builds the engine first, if given a builder); call from the
        event loop that will read the outputs. Requests may be queued at once; `await wait_ready()`."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="collab-decode-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> None:
        """Return once the engine is built; raise what building it raised (the thread has then ended)."""
        await asyncio.shield(self._ready)

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def add_request(self, prompt_ids: list[int], sampling: SamplingParams,
                          routing: RoutingSpec | str | None = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises EngineBusy past max_queue, ValueError for a request the engine refuses (empty or too
        long prompt, unknown policy, ...), EngineStopped if the server is shutting down.
        """
        if self._thread is None or self._stopping:
            raise EngineStopped("the engine is not running")
        if self.draining:
            raise EngineStopped("the server is shutting down; retry on another replica", code=SHUTTING_DOWN)
        if self.num_in_flight >= self.max_queue:
            self.metrics.requests.labels("busy").inc()
            raise EngineBusy(f"the server is at capacity ({self.num_in_flight} requests in flight, "
                             f"max_queue={self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        request = _Request(list(prompt_ids), sampling, routing, loop.create_future(), asyncio.Queue())
        stream = RequestStream(self, request)
        self.num_in_flight += 1
        self.metrics.in_flight.set(self.num_in_flight)
        self._submit(("add", request))
        try:
            await request.accepted
        except ValueError:
            self._close(request, None)  # the API layer counts it with the other invalid requests
            raise
        except EngineStopped:
            self._close(request, "error")
            raise
        except BaseException:  # cancelled while waiting: the engine may have added it already
            self._abort_request(request)
            raise
        return stream

    @property
    def _remote(self) -> bool:
        """The engine is in a process of its own (EngineProcess): adds are answered with a later step."""
        return isinstance(self.engine, EngineCoreClient)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _submit(self, command: tuple[str, _Request]) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _abort_request(self, request: _Request, outcome: str = "abort") -> None:
        if not request.closed:
            self._submit(("abort", request))
            self._close(request, outcome)

    def _close(self, request: _Request, outcome: str | None) -> None:
        """Free the request's admission slot (once) and count its outcome."""
        if request.closed:
            return
        request.closed = True
        self.num_in_flight -= 1
        self.metrics.in_flight.set(self.num_in_flight)
        if outcome is not None:
            self.metrics.requests.labels(outcome).inc()

    def _abandon(self, request: _Request) -> None:
        """A stream was garbage-collected (on any thread): abort its request on the loop if still open."""
        if not request.closed:
            self._post(self._abort_request, request)

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._build()
            self.metrics.set_engine_state(self.engine)
            self.metrics.watch_models(self.engine)
        except BaseException as e:  # SystemExit too: a thread would swallow it; the caller re-raises it
            with self._cond:
                self._stopping = True  # later add_request calls raise EngineStopped
            self._post(_settle, self._ready, e)
            self._fail_all(EngineStopped(f"the engine could not be built: {e!r}"))
            return
        self._post(_settle, self._ready, None)
        while True:
            with self._cond:
                while not (self._commands or self._stopping or self.engine.has_unfinished()):
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            adds = [request for kind, request in commands if kind == "add"]
            try:
                for request, result in zip(adds, self._add_all(adds)):
                    self._accept(request, result)
                for kind, request in commands:  # after the adds: a request may be added and aborted at once
                    if kind == "abort":
                        self._abort(request)
            except EngineCoreDied as e:  # it died while this thread waited for work: found by the next send
                for request in adds:  # (those not accepted yet are in no list _fail_all reads)
                    self._post(_settle, request.accepted, EngineStopped(f"the engine stopped: {e}"))
                self._died(e)
                continue
            if self.engine.has_unfinished():
                self._step()
            self.metrics.set_engine_state(self.engine)
        self._fail_all(EngineStopped("the server is shutting down", code=SHUTTING_DOWN))
        if self._remote:
            self.engine.close()

    def _add_all(self, requests: list[_Request]) -> list[int | Exception]:
        """Each request's sequence id, or the error that refused it. An engine process's client sends them and
        returns their ids at once; its answers come with a later step (_answered)."""
        if self._remote:
            return [self.engine.submit(r.prompt_ids, r.sampling, r.routing) for r in requests]
        results = []
        for r in requests:
            try:
                results.append(self.engine.add_request(r.prompt_ids, r.sampling, r.routing))
            except Exception as e:
                results.append(e)
        return results

    def _accept(self, request: _Request, result: int | Exception) -> None:
        if isinstance(result, Exception):  # ValueError: the request's fault; anything else: reported, not fatal
            if not isinstance(result, ValueError):
                log.error("add_request failed", exc_info=result)
            self._post(_settle, request.accepted, result)
            return
        request.seq_id = result
        self._active[request.seq_id] = request
        if not self._remote:  # else once the engine process answers (_answered)
            self._post(_settle, request.accepted, None)

    def _answered(self) -> None:
        """Settle the requests an engine process answered (before their outputs: the answers came first)."""
        answers, self.engine.answers = self.engine.answers, []
        for seq_id, error in answers:
            request = self._active.get(seq_id)
            if request is None:
                continue  # aborted meanwhile
            if error is None:
                self._post(_settle, request.accepted, None)
            else:
                del self._active[seq_id]
                self._accept(request, error)

    def _abort(self, request: _Request) -> None:
        if request.seq_id is not None and self._active.pop(request.seq_id, None) is not None:
            self.engine.abort(request.seq_id)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except EngineCoreDied as e:
            self._died(e)
            return
        except Exception:  # a fault of the step itself (one request's faults end only that request)
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(EngineStopped("the engine failed while running this request; the server logged the "
                                         "details"), include_queued=False)
            return
        if self._remote:
            self._answered()
        # an engine process's own steps, or this one
        for seconds in self.engine.step_seconds if self._remote else [time.perf_counter() - t0]:
            self.metrics.step_seconds.observe(seconds)
        deliveries = []
        for out in outputs:
            request = self._active.get(out.seq_id)
            if request is None:
                continue  # aborted meanwhile
            if out.finish_reason == "error":  # it failed on its own: fail it, keep serving the rest
                deliveries.append((request, RequestFailed(out.seq.error, out.seq.error_code)))
            else:
                deliveries.append((request, self._delta(request, out)))
            if out.finished:
                del self._active[out.seq_id]
        if deliveries:
            self._post(_deliver, deliveries)

    def _died(self, e: EngineCoreDied) -> None:
        """Nothing can run any more: fail everyone and stop (/health says so)."""
        log.error("the engine process died; failing every request and stopping: %s", e)
        with self._cond:
            self._stopping = True
        self._fail_all(EngineStopped(f"the engine stopped: {e}"))

    @staticmethod
    def _delta(request: _Request, out) -> Delta:
        seq, start = out.seq, request.num_sent
        end = start + len(out.new_token_ids)
        request.num_sent = end
        return Delta(token_ids=list(out.new_token_ids), text=out.new_text, provenance=list(out.new_provenance),
                     logprobs=seq.logprobs[start:end], top_logprobs=seq.top_logprobs[start:end],
                     prompt_logprobs=list(seq.prompt_logprobs) if start == 0 and seq.sampling.prompt_logprobs
                     is not None else None,
                     finished=out.finished, finish_reason=out.finish_reason,
                     num_prompt_tokens=seq.num_prompt_tokens, stats=seq.stats.as_dict(), queue_time_s=seq.queue_time_s)

    def _fail_all(self, error: Exception, include_queued: bool = True) -> None:
        """Fail every request in the engine (and those not yet added, when shutting down); free their blocks."""
        if include_queued:
            with self._cond:
                commands, self._commands = self._commands, []
            for kind, request in commands:
                if kind == "add":
                    self._post(_settle, request.accepted, error)
        for seq_id, request in list(self._active.items()):
            try:
                self.engine.abort(seq_id)
            except Exception:
                log.exception("abort of sequence %d failed", seq_id)
            self._post(_settle, request.accepted, error)  # one an engine process has not answered yet
            self._post(request.outputs.put_nowait, error)
        self._active.clear()
        if self.engine is not None:
            self.metrics.set_engine_state(self.engine)

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return  # the caller gave up waiting
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _deliver(deliveries: list[tuple[_Request, Delta]]) -> None:
    for request, delta in deliveries:
        request.outputs.put_nowait(delta)
