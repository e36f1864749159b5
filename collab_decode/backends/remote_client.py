"""HTTP transport of the remote backend: concurrent JSON calls with timeouts, bounded retries with
backoff, and a circuit breaker.

    RemoteClient.post_many(path, bodies) -> [dict | RemoteCallError]   blocks the caller (the engine thread)

The calls run on an asyncio loop private to the client (its own daemon thread, never torch), so the
routed sequences of one engine step go out together. A call is retried on a transport error, a timeout,
HTTP 429 or 5xx, waiting `backoff_s * 2**attempt` between tries; any other HTTP error is the request's
own fault and is not retried. `failure_threshold` calls in a row that exhaust their retries open the
circuit: from then on calls fail at once, and a probe of the endpoint's /health every `probe_interval_s`
closes it again when the endpoint answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import httpx

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 2.0


class RemoteCallError(Exception):
    """One call failed for good; `retryable`: the endpoint (not the request) was at fault."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class Circuit:
    """Consecutive failures open it; a successful call or probe closes it. Read from any thread."""

    def __init__(self, failure_threshold: int):
        self.failure_threshold = failure_threshold
        self.num_failures = 0  # calls in a row that failed for good
        self.open_reason: str | None = None  # why it is open; None while closed
        self.opened_at: float | None = None  # time.monotonic() when it opened
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.open_reason is not None

    def record_success(self) -> None:
        with self._lock:
            self.num_failures, self.open_reason, self.opened_at = 0, None, None

    def record_failure(self, reason: str) -> bool:
        """Count a failed call; True if this failure opened the circuit."""
        with self._lock:
            self.num_failures += 1
            if self.open_reason is None and self.num_failures >= self.failure_threshold:
                self.open_reason, self.opened_at = reason, time.monotonic()
                return True
            return False


class RemoteClient:
    """JSON over HTTP to one endpoint (`base_url` without /v1). Close it with close()."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30.0, max_retries: int = 2,
                 backoff_s: float = 0.1, max_concurrency: int = 64, failure_threshold: int = 3,
                 probe_interval_s: float = 1.0, transport: httpx.AsyncBaseTransport | None = None):
        """`transport`: httpx's, for tests (default: real connections)."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.probe_interval_s = probe_interval_s
        self.max_concurrency = max_concurrency
        self.circuit = Circuit(failure_threshold)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="remote-backend-http", daemon=True)
        self._thread.start()
        self._http: httpx.AsyncClient = self._run(self._make_http(headers, max_concurrency, transport), None)
        self._limit = asyncio.Semaphore(max_concurrency)
        self._probe: asyncio.Future | None = None

    async def _make_http(self, headers: dict, max_concurrency: int, transport) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 5.0))
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, limits=limits,
                                 transport=transport)

    def _run(self, coroutine, timeout: float | None):
        """Run a coroutine on the client's loop and wait for it here."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise RemoteCallError(f"{self.base_url} did not answer within {timeout:.0f}s", retryable=True) from None

    # ---- calls (caller's thread) -----------------------------------------------------------------
    def post_many(self, path: str, bodies: list[dict]) -> list[dict | RemoteCallError]:
        """POST each body to `path` concurrently; per body, the JSON answer or the error it ended with."""
        return self._run(self._gather([self._call("POST", path, body) for body in bodies]), None)

    def get(self, path: str, deadline_s: float | None = None) -> dict:
        """GET `path` as JSON, retrying (transport errors, 5xx) until it answers or `deadline_s` passes;
        raises RemoteCallError."""
        deadline = time.monotonic() + (deadline_s or 0)
        while True:
            result = self._run(self._gather([self._call("GET", path, None, count=False)]), None)[0]
            if not isinstance(result, RemoteCallError):
                return result
            if not result.retryable or time.monotonic() >= deadline:
                raise result
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def unavailable(self) -> str | None:
        """Why the endpoint is considered down (the circuit is open), or None."""
        reason = self.circuit.open_reason
        return None if reason is None else f"{self.base_url} unavailable: {reason}"

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._http.aclose(), 10)
        except Exception:  # noqa: BLE001  (closing a client whose loop is going away)
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # ---- on the client's loop --------------------------------------------------------------------
    async def _gather(self, calls) -> list:
        return await asyncio.gather(*calls, return_exceptions=True)

    async def _call(self, method: str, path: str, body: dict | None, count: bool = True) -> dict:
        """One call with retries; counts its outcome in the circuit (unless `count` is False)."""
        if count and self.circuit.is_open:
            raise RemoteCallError(self.unavailable(), retryable=True)
        for attempt in range(self.max_retries + 1):
            try:
                async with self._limit:
                    response = await self._http.request(method, path, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out...
                error = RemoteCallError(f"{method} {self.base_url}{path}: {type(e).__name__}: {e}".rstrip(": "),
                                        retryable=True)
            else:
                if response.status_code < 400:
                    if count:
                        self.circuit.record_success()
                    return response.json()
                error = RemoteCallError(f"{method} {self.base_url}{path}: HTTP {response.status_code}: "
                                        f"{_error_message(response)}",
                                        retryable=response.status_code in RETRY_STATUS)
            if not error.retryable or (count and self.circuit.is_open) or attempt == self.max_retries:
                break
            await asyncio.sleep(min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt))
        if count and error.retryable and self.circuit.record_failure(str(error)):
            log.warning("circuit opened: %s", error)
            self._probe = asyncio.ensure_future(self._probe_until_up())
        raise error

    async def _probe_until_up(self) -> None:
        """While the circuit is open, GET /health every probe_interval_s; close it on the first 200."""
        while self.circuit.is_open:
            await asyncio.sleep(self.probe_interval_s)
            try:
                response = await self._http.get("/health")
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                log.warning("%s answers again: circuit closed", self.base_url)
                self.circuit.record_success()


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}} or {"message"}), else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:500]
    return str(body)[:500]
