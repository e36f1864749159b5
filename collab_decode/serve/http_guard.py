"""The REST server's outer guard, in front of FastAPI, and the connection timeouts under it.

    connection: HeaderTimeoutProtocol (uvicorn's HTTP protocol) closes a connection whose request headers
                are not complete within header_timeout_s (a slowloris client) or pass MAX_HEADER_BYTES
                (431); uvicorn's keep-alive timeout closes idle ones
    request:    RequestGuard: a request id (the client's `x-request-id` if sane, else a new one) on every
                response -> 503 while the server drains -> the body read in full, at most max_body_bytes
                by Content-Length and by the bytes that arrive (413), each part within idle_timeout_s (408)
                -> valid UTF-8 and no lone surrogate escapes in a JSON body (400) -> the app, which
                reads the buffered body
Errors here carry OpenAI's body, as the app's own do.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Callable

from starlette.responses import JSONResponse
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from collab_decode.serve.waiting import wait_for

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")
_OPEN_PATHS = ("/health", "/metrics")  # still answered while draining (they say so)
MAX_HEADER_BYTES = 64 * 1024  # a request's line and headers (h11's own bound is 16 KiB; httptools has none)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class RequestGuard:
    """ASGI middleware (see the module docstring). `draining()` says whether the server is shutting down."""

    def __init__(self, app, max_body_bytes: int, idle_timeout_s: float, draining: Callable[[], bool]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.draining = draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        if self.draining() and scope["path"] not in _OPEN_PATHS:
            return await _reject(send_with_id, 503, "the server is shutting down; retry on another replica",
                                 "server_error", "server_shutting_down")
        body = await self._read_body(scope, receive, send_with_id)
        if body is None:
            return  # answered already
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, when the client goes away
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_with_id)

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None once an error response went out (or the client left)."""
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _too_large(send, self.max_body_bytes)
        chunks, num_bytes = [], 0
        while True:
            try:
                message = await wait_for(receive(), self.idle_timeout_s)
            except asyncio.TimeoutError:
                return await _reject(send, 408, f"the request body did not arrive within {self.idle_timeout_s} s",
                                     "invalid_request_error", "request_timeout", close=True)
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            num_bytes += len(chunk)
            if num_bytes > self.max_body_bytes:  # a chunked body has no Content-Length: count what arrives
                return await _too_large(send, self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = _unicode_problem(body)
        if problem is not None:
            return await _reject(send, 400, problem, "invalid_request_error", "invalid_unicode")
        return body


def _unicode_problem(body: bytes) -> str | None:
    """Why a body is not valid Unicode text, or None. A JSON escape of a lone surrogate ("\\ud800") is valid
    JSON but no text: it is looked for only where such an escape appears at all."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the request body is not valid UTF-8 (byte {e.start})"
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        if _holds_lone_surrogate(json.loads(body)):
            return "the request body holds a string that is not valid Unicode (a lone surrogate escape such as \\ud800)"
    except (ValueError, RecursionError):
        return None  # not JSON, or nested past what Python parses: the app answers 400
    return None


def _holds_lone_surrogate(payload) -> bool:
    """Whether any string in a parsed JSON value (keys too) fails to encode; iterative: any depth."""
    pending = [payload]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, dict):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, list):
            pending += value
    return False


def _request_id(scope) -> str:
    given = _header(scope, b"x-request-id")
    if given is not None and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1").strip()
    return None


async def _too_large(send, max_body_bytes: int) -> None:
    await _reject(send, 413, f"the request body is larger than this server takes ({max_body_bytes} bytes)",
                  "invalid_request_error", "request_too_large", close=True)


async def _reject(send, status: int, message: str, type: str, code: str, close: bool = False) -> None:
    """An OpenAI-style error; `close`: the body was not read to its end, so the connection cannot be reused."""
    headers = {"connection": "close"} if close else None
    response = JSONResponse(error_body(message, type, None, code), status_code=status, headers=headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive():
    return {"type": "http.disconnect"}


def header_timeout_protocol(header_timeout_s: float) -> type:
    """uvicorn's HTTP protocol (httptools or h11), closing a connection that does not complete its request
    headers within `header_timeout_s` of opening or of its previous response (uvicorn itself waits forever
    once a byte of them arrived: a slowloris client holds a connection with a byte now and then)."""

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._awaiting_headers() and not self.transport.is_closing():
                self._num_header_bytes += len(data)  # none of it completed a request's headers
                if self._num_header_bytes > MAX_HEADER_BYTES:
                    self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                                         b"connection: close\r\n\r\n")
                    self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._timed_cycle = self.cycle  # a new request replaces the cycle once its headers are complete
            self._num_header_bytes = 0
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timed_out)

        def _awaiting_headers(self) -> bool:
            """No request's headers completed since the timer was armed, and none is being answered."""
            in_request = self.cycle is not None and not self.cycle.response_complete
            return self.cycle is self._timed_cycle and not in_request

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self._awaiting_headers() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
