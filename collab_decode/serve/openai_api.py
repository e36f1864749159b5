"""The OpenAI-compatible REST API: a thin FastAPI adapter over AsyncEngine.

    /v1/completions, /v1/chat/completions  (stream: server-sent events, OpenAI chunks, then [DONE])
    /v1/models, /health (503 once the engine stopped; "degraded" while a remote model is down), /metrics

Each generation request: parse (strict types) -> prompt ids + SamplingParams + routing spec ->
AsyncEngine.add_request (400 if the engine refuses it, 429 past the queue bound) -> stream or collect.
A client that goes away mid-request aborts its sequence, which frees its KV blocks before the next step.
Every error body is OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from collab_decode.serve import protocol
from collab_decode.serve.async_engine import AsyncEngine, Delta, EngineBusy, EngineStopped, RequestFailed, RequestStream
from collab_decode.serve.metrics import CONTENT_TYPE_LATEST
from collab_decode.serve.protocol import ChatCompletionRequest, CompletionRequest
from collab_decode.serve.requests import ServedModel, chat_prompt_ids, routing_spec, text_prompt_ids

_DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type, param, code, headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def create_app(engine: AsyncEngine, model: ServedModel, tokenizer, api_key: str | None = None) -> FastAPI:
    """The REST app. `tokenizer` is used on the event loop: give it its own copy (the engine thread
    decodes with the engine's)."""
    app = FastAPI(title="collab-decode", description="OpenAI-compatible API over a small-large model pair")
    _add_error_handlers(app, engine)
    routes = _Routes(engine, model, tokenizer, api_key)
    key = [Depends(routes.check_key)]
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"], dependencies=key)
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"], dependencies=key)
    app.add_api_route("/v1/models", routes.models, methods=["GET"], dependencies=key)
    app.add_api_route("/v1/models/{name:path}", routes.model_card, methods=["GET"], dependencies=key)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    return app


class _Routes:
    def __init__(self, engine: AsyncEngine, model: ServedModel, tokenizer, api_key: str | None):
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            self.engine.metrics.requests.labels("unauthorized").inc()
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def completions(self, req: CompletionRequest, request: Request):
        with _client_errors():
            req.check_supported()
            self.model.check_name(req.model)
            prompt = req.single_prompt()
            prompt_ids = text_prompt_ids(self.tokenizer, prompt) if isinstance(prompt, str) else prompt
            max_tokens = protocol.COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
            sampling = req.sampling_params(max_tokens, req.logprobs, req.prompt_logprobs)
            routing = routing_spec(req.routing)
        stream = await self._start(prompt_ids, sampling, routing)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model.name}

        def choice(deltas: list[Delta], text_offset: int = 0) -> dict:
            out = {"index": 0, "text": "".join(d.text for d in deltas), "logprobs": None,
                   "finish_reason": deltas[-1].finish_reason if deltas[-1].finished else None}
            if req.logprobs is not None:
                out["logprobs"] = protocol.completion_logprobs(self.tokenizer, deltas, text_offset,
                                                               req.return_tokens_as_token_ids)
            if deltas[0].prompt_logprobs is not None:  # the first delta of a request that asked
                out["prompt_logprobs"] = protocol.prompt_logprobs(self.tokenizer, prompt_ids, deltas[0].prompt_logprobs)
            if req.return_provenance:
                out.update(protocol.provenance_fields(deltas))
            return out

        if req.stream:
            return _sse(_completion_events(stream, head, choice, req.include_usage))
        deltas = await _collect(stream, request)
        return {**head, "choices": [choice(deltas)], "usage": protocol.usage(deltas)}

    async def chat_completions(self, req: ChatCompletionRequest, request: Request):
        with _client_errors():
            req.check_supported()
            self.model.check_name(req.model)
            prompt_ids = chat_prompt_ids(self.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if max_tokens is None:  # OpenAI's default: whatever context is left
                max_tokens = self.engine.engine.max_tokens_left(len(prompt_ids))
            sampling = req.sampling_params(max_tokens, req.engine_logprobs())
            routing = routing_spec(req.routing)
        stream = await self._start(prompt_ids, sampling, routing)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model.name}

        def extras(deltas: list[Delta]) -> dict:
            out = {"logprobs": protocol.chat_logprobs(self.tokenizer, deltas) if req.logprobs else None}
            if req.return_provenance:
                out.update(protocol.provenance_fields(deltas))
            return out

        if req.stream:
            return _sse(_chat_events(stream, head, extras, req.include_usage))
        deltas = await _collect(stream, request)
        message = {"role": "assistant", "content": "".join(d.text for d in deltas)}
        choice = {"index": 0, "message": message, "finish_reason": deltas[-1].finish_reason, **extras(deltas)}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": protocol.usage(deltas)}

    async def _start(self, prompt_ids: list[int], sampling, routing) -> RequestStream:
        try:
            return await self.engine.add_request(prompt_ids, sampling, routing)
        except EngineBusy as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise ApiError(503, str(e), type="server_error") from None
        except ValueError as e:
            raise _invalid(e) from None

    async def models(self):
        return {"object": "list", "data": [self._card()]}

    async def model_card(self, name: str):
        if name != self.model.name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.model.name!r}",
                           param="model", code="model_not_found")
        return self._card()

    def _card(self) -> dict:
        engine = self.engine.engine
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "collab-decode",
                "max_model_len": engine.max_model_len, "small_model": self.model.small_dir,
                "large_model": self.model.large_dir, "default_policy": engine.config.default_policy}

    async def health(self):
        """503 once the engine stopped. While a model is unavailable (the large model's endpoint is down)
        the server still serves whatever does not need it: 200, status "degraded", and why."""
        if not self.engine.is_running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        unavailable = self.engine.engine.unavailable_models()
        if unavailable:
            return {"status": "degraded", "unavailable": unavailable}
        return {"status": "ok"}

    async def metrics(self):
        return Response(self.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---- streaming ------------------------------------------------------------------------------------
def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _events(stream: RequestStream, head: dict, make_choice, include_usage: bool, opening: dict | None = None):
    """SSE chunks of one request: an optional opening choice, one chunk per delta, usage, [DONE]."""
    deltas = []
    async with stream:  # leaving early (the client went away: this generator is cancelled) aborts it
        try:
            if opening is not None:
                yield _event({**head, "choices": [opening]})
            async for delta in stream:
                deltas.append(delta)
                chunk = {**head, "choices": [make_choice(delta)]}
                if delta.finished:
                    chunk["usage"] = protocol.usage(deltas)
                yield _event(chunk)
        except RequestFailed as e:
            yield _event(error_body(str(e), "server_error"))
    if include_usage and deltas:
        yield _event({**head, "choices": [], "usage": protocol.usage(deltas)})
    yield "data: [DONE]\n\n"


def _completion_events(stream: RequestStream, head: dict, choice, include_usage: bool):
    text_offset = 0

    def make_choice(delta):
        nonlocal text_offset
        made = choice([delta], text_offset)
        text_offset += len(delta.text)
        return made

    return _events(stream, head, make_choice, include_usage)


def _chat_events(stream: RequestStream, head: dict, extras, include_usage: bool):
    def make_choice(delta):
        return {"index": 0, "delta": {"content": delta.text} if delta.text else {},
                "finish_reason": delta.finish_reason if delta.finished else None, **extras([delta])}

    opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _events(stream, {**head, "object": "chat.completion.chunk"}, make_choice, include_usage, opening)


async def _collect(stream: RequestStream, request: Request) -> list[Delta]:
    """All of a non-streaming request's output; aborts it if the client disconnects meanwhile."""
    async with stream:
        task = asyncio.ensure_future(stream.collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ApiError(499, "client closed the request", code="client_closed_request")
        except RequestFailed as e:
            raise ApiError(503, str(e), type="server_error") from None
        finally:
            task.cancel()


# ---- errors ---------------------------------------------------------------------------------------
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "stop")


def _invalid(e: ValueError) -> ApiError:
    param = getattr(e, "param", None)
    if param is None:  # SamplingParams names the field first: "max_tokens must be ..."
        first = str(e).split(" ", 1)[0]
        param = first if first in _SAMPLING_FIELDS else None
    return ApiError(400, str(e), param=param, code=getattr(e, "code", None))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # union members pydantic puts in `loc`


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's errors -> one message naming the field (all union alternatives) and the field path."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None

    def field(error: dict) -> str | None:
        parts = [str(p) for p in error.get("loc", ()) if p != "body" and str(p) not in _TYPE_TAGS and "[" not in str(p)]
        return ".".join(parts) or None

    param = field(first)
    reasons = list(dict.fromkeys(err["msg"] for err in errors if field(err) == param))
    got = f" (got {first['input']!r})" if param and first.get("type") != "missing" else ""
    message = f"{param or 'body'}: {'; or '.join(reasons)}{got}"
    return message, param


@contextlib.contextmanager
def _client_errors():
    """ValueErrors while reading a request (bad sampling values, unknown model...) are the client's: 400."""
    try:
        yield
    except ValueError as e:
        raise _invalid(e) from None


def _add_error_handlers(app: FastAPI, engine: AsyncEngine) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        if e.status == 400:
            engine.metrics.requests.labels("invalid").inc()
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        engine.metrics.requests.labels("invalid").inc()
        message, param = _validation_message(e.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {e!r}", "server_error"), status_code=500)
