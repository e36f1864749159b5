"""The OpenAI-compatible REST API: a thin FastAPI adapter over AsyncEngine.

    /v1/completions, /v1/chat/completions  (stream: server-sent events, OpenAI chunks, then [DONE])
    /v1/models, /health (503 once the engine stopped; "degraded" while a remote model is down), /metrics

Each generation request: parse (strict types) -> prompt ids + SamplingParams + routing spec ->
AsyncEngine.add_request (400 if the engine refuses it, 429 past the queue bound) -> stream or collect.
A client that goes away mid-request aborts its sequence, which frees its KV blocks before the next step.
Every error body is OpenAI's: {"error": {"message", "type", "param", "code"}}; an unexpected error is logged with
the request's id, and its body says only that (every response carries the id in `x-request-id`). The OpenAPI
schema documents each error status a route answers, with that body (and no FastAPI 422: validation is a 400).
In front of the app, RequestGuard (serve/http_guard.py) caps and checks the body and answers 503 while the
server drains; serve/limits.py checks prompts, max_tokens, stop strings and messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from collab_decode.sampling import SamplingParams
from collab_decode.serve import protocol
from collab_decode.serve.async_engine import (AsyncEngine, Delta, EngineBusy, EngineStopped, RequestFailed,
                                              RequestStream, RequestTimedOut)
from collab_decode.serve.choices import collect_all, merge, opened, start_all, without_output
from collab_decode.serve.http_guard import REQUEST_ID_HEADER, RequestGuard, error_body
from collab_decode.serve.limits import Limits, PromptTokenizer
from collab_decode.serve.metrics import CONTENT_TYPE_LATEST
from collab_decode.serve.protocol import ChatCompletionRequest, CompletionRequest
from collab_decode.serve.requests import ServedModel, bearer_key_matches, routing_spec

log = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type, param, code, headers


def create_app(engine: AsyncEngine, model: ServedModel, tokenizer, api_key: str | None = None,
               limits: Limits | None = None, prompts: PromptTokenizer | None = None) -> FastAPI:
    """The REST app. `tokenizer` is used on the event loop: give it its own copy (the engine thread
    decodes with the engine's); `prompts` tokenizes large prompts off the loop (default: one over it)."""
    limits = limits or Limits()
    app = FastAPI(title="collab-decode", description="OpenAI-compatible API over a small-large model pair",
                  docs_url=None, redoc_url=None, openapi_url=None)  # added below, behind the key when there is one
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, idle_timeout_s=limits.idle_timeout_s,
                       draining=lambda: engine is not None and engine.draining)
    _add_error_handlers(app, engine)
    routes = _Routes(engine, model, tokenizer, api_key, limits, prompts or PromptTokenizer(tokenizer))
    key = [Depends(routes.check_key)]
    _add_docs(app, key)
    generation = {200: {"description": "the completion (JSON), or with `stream` its server-sent events",
                        "content": {"text/event-stream": {}}}, **_errors(400, 401, 408, 413, 429, 500, 503, 504)}
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"], dependencies=key, responses=generation)
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"], dependencies=key,
                      responses=generation)
    app.add_api_route("/v1/models", routes.models, methods=["GET"], dependencies=key, responses=_errors(401, 503))
    app.add_api_route("/v1/models/{name:path}", routes.model_card, methods=["GET"], dependencies=key,
                      responses=_errors(401, 404, 503))
    app.add_api_route("/health", routes.health, methods=["GET"], responses={503: {
        "description": "draining, or the engine stopped: {\"status\": \"draining\" | \"engine stopped\"}"}})
    app.add_api_route("/metrics", routes.metrics, methods=["GET"], response_class=PlainTextResponse)
    return app


_ERROR_MEANINGS = {
    400: "an invalid request: a field out of range or of the wrong type, a limit passed, text that is not valid "
         "Unicode (the body names the field in `param`)",
    401: "no or wrong API key (send `Authorization: Bearer KEY`)",
    404: "no such model",
    408: "the request body stopped arriving (idle timeout)",
    413: "the request body is larger than the server takes",
    429: "the server is at capacity (max_queue); retry after `Retry-After` seconds",
    500: "the server could not compute this request (`code` model_error: a model's logits were not finite; "
         "internal_error: the engine raised on it); asking again will not help",
    503: "the server is shutting down, or its engine stopped, or the large model's endpoint could not run this "
         "request (`code` upstream_error)",
    504: "the request ran past the server's request timeout",
}


def _errors(*statuses: int) -> dict:
    """OpenAPI `responses` for these error statuses: each an OpenAI error body (protocol.ErrorResponse)."""
    return {status: {"model": protocol.ErrorResponse, "description": _ERROR_MEANINGS[status]} for status in statuses}


def _documented_schema(app: FastAPI) -> dict:
    """The app's OpenAPI schema without FastAPI's 422 responses: validation errors are answered 400, OpenAI's way."""
    if app.openapi_schema is None:
        schema = app.openapi()
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema


def _add_docs(app: FastAPI, key: list) -> None:
    """/openapi.json, /docs and /redoc, behind the API key when there is one."""
    async def openapi():
        return JSONResponse(_documented_schema(app))

    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="collab-decode")

    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="collab-decode")

    for path, endpoint in (("/openapi.json", openapi), ("/docs", docs), ("/redoc", redoc)):
        app.add_api_route(path, endpoint, methods=["GET"], dependencies=key, include_in_schema=False)


class _Routes:
    def __init__(self, engine: AsyncEngine, model: ServedModel, tokenizer, api_key: str | None, limits: Limits,
                 prompts: PromptTokenizer):
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.limits = limits
        self.prompts = prompts
        self.created = int(time.time())

    async def check_key(self, request: Request) -> None:
        # async: FastAPI runs a plain `def` dependency on a worker thread, two thread hops on every request
        # (~1 ms of a request's latency here, docs/benchmarks.md, Session 18), for a comparison that never blocks
        if self.api_key is None:
            return
        if not bearer_key_matches(request.headers.get("authorization", ""), self.api_key):
            self.engine.metrics.requests.labels("unauthorized").inc()
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def completions(self, req: CompletionRequest, request: Request):
        with _client_errors():
            req.check_supported()
            self.model.check_name(req.model)
            self._check_lists(req)
            prompts = [(await self._prompt_ids(p), p if isinstance(p, str) else None) for p in req.prompts()]
            self.limits.check_max_tokens(req.max_tokens)
            samplings = req.choice_samplings(req.engine_sampling())
            routing = routing_spec(req.routing)
        streams = await self._start_all([(ids, s) for ids, _ in prompts for s in samplings], routing)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model.name}
        render = _CompletionChoices(self.tokenizer, req, prompts, len(samplings))
        trim = without_output if req.echo_only else None
        if req.stream:
            return _sse(_events(streams, head, lambda i, d: render.choice(i, [d]), req.include_usage,
                                len(samplings), trim=trim))
        choices = await _collect(streams, request)
        if trim is not None:
            choices = [[trim(d) for d in deltas] for deltas in choices]
        # echo and prompt logprobs decode every prompt token (and its alternatives): off the loop when many
        num_scored = sum(len(ids) for ids, _ in prompts) if req.echo or req.prompt_logprobs is not None else 0
        rendered = await self.prompts.decode(lambda tokenizer: [_CompletionChoices(
            tokenizer, req, prompts, len(samplings)).choice(i, deltas) for i, deltas in enumerate(choices)], num_scored)
        return {**head, "choices": rendered, "usage": protocol.usage(choices, len(samplings))}

    async def chat_completions(self, req: ChatCompletionRequest, request: Request):
        with _client_errors():
            req.check_supported()
            self.model.check_name(req.model)
            self._check_lists(req)
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            self.limits.check_messages(messages)
            prompt_ids = await self.prompts.chat_ids(messages)
            self.limits.check_prompt_ids(prompt_ids, "messages")
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            self.limits.check_max_tokens(max_tokens, "max_completion_tokens" if req.max_completion_tokens else
                                         "max_tokens")
            if max_tokens is None:  # OpenAI's default: whatever context is left, within the server's cap
                max_tokens = self.limits.cap_max_tokens(self.engine.engine.max_tokens_left(len(prompt_ids)))
            samplings = req.choice_samplings(req.sampling_params(max_tokens, req.engine_logprobs()))
            routing = routing_spec(req.routing)
        streams = await self._start_all([(prompt_ids, s) for s in samplings], routing)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model.name}

        def extras(deltas: list[Delta]) -> dict:
            out = {"logprobs": protocol.chat_logprobs(self.tokenizer, deltas) if req.logprobs else None}
            if req.return_provenance:
                out.update(protocol.provenance_fields(deltas))
            return out

        if req.stream:
            return _sse(_chat_events(streams, head, extras, req.include_usage))
        choices = await _collect(streams, request)
        answers = [{"index": i, "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
                    "finish_reason": deltas[-1].finish_reason, **extras(deltas)} for i, deltas in enumerate(choices)]
        return {**head, "object": "chat.completion", "choices": answers, "usage": protocol.usage(choices, len(choices))}

    def _check_lists(self, req) -> None:
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        self.limits.check_stop(stop, req.stop_token_ids or [])

    async def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt's token ids (text: length-checked first, then tokenized, off the loop if large)."""
        if isinstance(prompt, str):
            self.limits.check_text(prompt)
            prompt = await self.prompts.text_ids(prompt)
        self.limits.check_prompt_ids(prompt)
        return prompt

    async def _start_all(self, jobs: list[tuple[list[int], SamplingParams]], routing) -> list[RequestStream]:
        """Start a request's choices (prompt ids, sampling) together, so one engine step admits them all. If
        the engine refuses one, the others are aborted and the refusal is the answer."""
        if len(jobs) > self.engine.max_queue:
            raise ApiError(400, f"this request asks for {len(jobs)} completions (prompts x n), more than the server "
                                f"holds at once (max_queue={self.engine.max_queue})", param="n")
        try:
            return await start_all(self.engine, jobs, routing)
        except EngineBusy as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise ApiError(503, str(e), type="server_error", code=e.code) from None
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
        """What the model is, by name: never a checkpoint's path or a remote endpoint's address."""
        engine = self.engine.engine
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "collab-decode",
                "max_model_len": engine.max_model_len, "small_model": self.model.small_name,
                "large_model": self.model.large_name, "default_policy": engine.config.default_policy}

    async def health(self):
        """503 once the engine stopped. While a model is unavailable (the large model's endpoint is down)
        the server still serves whatever does not need it: 200, status "degraded", and why."""
        if self.engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
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


async def _events(streams: list[RequestStream], head: dict, make_choice, include_usage: bool, n: int = 1,
                  opening=None, trim=None):
    """SSE chunks of a request's choices: optional opening chunks (`opening(index)`, one per choice), then a
    chunk per delta naming its choice (`make_choice(index, delta)`; `trim` applied to the delta first), the
    usage with the chunk that finishes the last choice, [DONE]."""
    choices: list[list[Delta]] = [[] for _ in streams]
    num_open = len(streams)
    async with opened(streams):  # leaving early (the client went away: this generator is cancelled) aborts them
        try:
            for index in range(len(streams) if opening is not None else 0):
                yield _event({**head, "choices": [opening(index)]})
            async with contextlib.aclosing(merge(streams)) as deltas:
                async for index, delta in deltas:
                    delta = trim(delta) if trim is not None else delta
                    choices[index].append(delta)
                    chunk = {**head, "choices": [make_choice(index, delta)]}
                    num_open -= delta.finished
                    if delta.finished and not num_open:
                        chunk["usage"] = protocol.usage(choices, n)
                    yield _event(chunk)
        except RequestFailed as e:  # shutdown, timeout, a model that could not run it: said in the stream
            yield _event(error_body(str(e), "server_error", code=e.code))
    if include_usage and any(choices):
        yield _event({**head, "choices": [], "usage": protocol.usage(choices, n)})
    yield "data: [DONE]\n\n"


class _CompletionChoices:
    """Builds a completion request's choices: whole (non-streaming) or chunk by chunk (streaming), keeping
    each choice's text offset. With echo, a choice's first chunk starts with its prompt (and its logprobs
    with the prompt's)."""

    def __init__(self, tokenizer, req: CompletionRequest, prompts: list[tuple[list[int], str | None]], n: int):
        self.tokenizer, self.req, self.prompts, self.n = tokenizer, req, prompts, n
        self.offsets: dict[int, int] = {}  # choice index -> characters of text sent so far, echo included

    def choice(self, index: int, deltas: list[Delta]) -> dict:
        req, tokenizer = self.req, self.tokenizer
        prompt_ids, prompt_text = self.prompts[index // self.n]
        echo = req.echo and index not in self.offsets
        echoed = (prompt_text if prompt_text is not None else tokenizer.decode(prompt_ids)) if echo else ""
        offset = self.offsets.get(index, 0) + len(echoed)
        out = {"index": index, "text": echoed + "".join(d.text for d in deltas), "logprobs": None,
               "finish_reason": deltas[-1].finish_reason if deltas[-1].finished else None}
        scored = deltas[0].prompt_logprobs  # on a choice's first delta, if asked
        if req.logprobs is not None:
            out["logprobs"] = protocol.completion_logprobs(tokenizer, deltas, offset, req.return_tokens_as_token_ids)
            if echo:
                out["logprobs"] = protocol.join_logprobs(protocol.echo_logprobs(
                    tokenizer, prompt_ids, scored, req.logprobs, req.return_tokens_as_token_ids), out["logprobs"])
        if req.prompt_logprobs is not None and scored is not None:
            out["prompt_logprobs"] = protocol.prompt_logprobs(tokenizer, prompt_ids, scored, req.prompt_logprobs)
        if req.return_provenance:
            out.update(protocol.provenance_fields(deltas))
        self.offsets[index] = self.offsets.get(index, 0) + len(out["text"])
        return out


def _chat_events(streams: list[RequestStream], head: dict, extras, include_usage: bool):
    def make_choice(index, delta):
        return {"index": index, "delta": {"content": delta.text} if delta.text else {},
                "finish_reason": delta.finish_reason if delta.finished else None, **extras([delta])}

    def opening(index):
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    return _events(streams, {**head, "object": "chat.completion.chunk"}, make_choice, include_usage, len(streams),
                   opening=opening)


async def _collect(streams: list[RequestStream], request: Request) -> list[list[Delta]]:
    """Every choice's output (a non-streaming request's); aborts them all if the client disconnects meanwhile."""
    async with opened(streams):
        task = asyncio.ensure_future(collect_all(streams))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ApiError(499, "client closed the request", code="client_closed_request")
        except RequestTimedOut as e:
            raise ApiError(504, str(e), type="server_error", code=e.code) from None
        except RequestFailed as e:
            raise ApiError(500 if e.server_fault else 503, str(e), type="server_error", code=e.code) from None
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
    got = f" (got {_shortened(repr(first['input']))})" if param and first.get("type") != "missing" else ""
    message = f"{param or 'body'}: {'; or '.join(reasons)}{got}"
    return message, param


def _shortened(text: str, num_chars: int = 200) -> str:
    """An echoed input, cut: a megabyte of wrong-typed prompt is not sent back."""
    return text if len(text) <= num_chars else f"{text[:num_chars]}... ({len(text)} characters)"


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
        """Logged with the request's id; the body says only that something failed, and that id."""
        request_id = request.scope.get("state", {}).get("request_id", "-")
        log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=e)
        message = f"internal server error (request id {request_id}); the server's log holds the details"
        return JSONResponse(error_body(message, "server_error", code="internal_error"), status_code=500,
                            headers={REQUEST_ID_HEADER: request_id})
