"""The gRPC API (protos/collab_decode/v1/collab_decode.proto): a thin grpc.aio adapter over AsyncEngine.

Generate collects a request's deltas into one response; GenerateStream sends each delta as it comes, and
streams the n choices of a request with n > 1 (interleaved, each message naming its `index`; with a seed,
choice i samples with seed + i). `prompt_logprobs` scores the prompt (the large model unless routing is small).
Bad input -> INVALID_ARGUMENT, past the queue bound -> RESOURCE_EXHAUSTED, a request a model could not
run (the large model's endpoint is down) -> UNAVAILABLE, no or wrong key (metadata
`authorization: Bearer KEY`) -> UNAUTHENTICATED. A cancelled call (client gone, deadline) cancels its
handler, which aborts its sequences. The standard health service runs beside it. A request that does not
parse (any RPC, health's too) is INVALID_ARGUMENT; n past max_queue too (it could never be admitted).
The REST server's limits hold here too (serve/limits.py): past one, INVALID_ARGUMENT; a message larger than
max_body_bytes, RESOURCE_EXHAUSTED; a request past the request timeout, DEADLINE_EXCEEDED; while the server
drains, new calls and (at the drain's end) unfinished ones get UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
from importlib.metadata import PackageNotFoundError, version

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from collab_decode.routing import POLICY_NAMES
from collab_decode.sampling import SamplingParams
from collab_decode.serve import protocol
from collab_decode.serve.async_engine import (AsyncEngine, Delta, EngineBusy, EngineStopped, RequestFailed,
                                              RequestStream, RequestTimedOut)
from collab_decode.serve.choices import merge, opened, start_all
from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from collab_decode.serve.limits import Limits, PromptTokenizer, check_unicode
from collab_decode.serve.requests import (InvalidRequest, ServedModel, bearer_key_matches, choice_samplings,
                                          routing_spec)

SERVICE_NAME = "collab_decode.v1.CollabDecode"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
_MODEL_ENUM = {"small": pb.MODEL_SMALL, "large": pb.MODEL_LARGE}


class CollabDecodeService(pb_grpc.CollabDecodeServicer):
    def __init__(self, engine: AsyncEngine, model: ServedModel, tokenizer, api_key: str | None = None,
                 limits: Limits | None = None, prompts: PromptTokenizer | None = None):
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer  # the loop's own copy (the engine thread decodes with the engine's)
        self.api_key = api_key
        self.limits = limits or Limits()
        self.prompts = prompts or PromptTokenizer(tokenizer)
        self.health: health.aio.HealthServicer | None = None  # set by start_grpc_server

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        [stream] = await self._start(request, context, unary=True)
        async with stream:
            deltas = await _or_unavailable(stream.collect(), context)
        return _response(deltas, usage=[deltas])

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        """Each choice's deltas as they come (interleaved, each naming its index); usage on the last message."""
        streams = await self._start(request, context)
        choices: list[list[Delta]] = [[] for _ in streams]
        num_open = len(streams)
        async with opened(streams):
            try:
                async with contextlib.aclosing(merge(streams)) as deltas:
                    async for index, delta in deltas:
                        choices[index].append(delta)
                        num_open -= delta.finished
                        yield _response([delta], index, usage=None if num_open else choices)
            except RequestFailed as e:
                await context.abort(_failed_status(e), str(e))

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        await self._check_key(context)
        await _check_parsed(request, context)
        engine = self.engine.engine
        return pb.ServerInfo(model=self.model.name, small_model=self.model.small_name,
                             large_model=self.model.large_name or "", default_policy=engine.config.default_policy,
                             policies=list(POLICY_NAMES), max_model_len=engine.max_model_len,
                             max_queue=self.engine.max_queue, version=_version())

    async def _start(self, request: pb.GenerateRequest, context, unary: bool = False) -> list[RequestStream]:
        """Check the key, read the request, add its choices to the engine; aborts the call with the right status."""
        await self._check_key(context)
        await _check_parsed(request, context)
        try:
            if unary and request.n > 1:
                raise InvalidRequest(f"n > 1 (got {request.n}) streams its choices: call GenerateStream", param="n")
            if request.n > self.engine.max_queue:  # could never be admitted: not a RESOURCE_EXHAUSTED to retry
                raise InvalidRequest(f"n = {request.n} asks for more completions than the server holds at once "
                                     f"(max_queue={self.engine.max_queue})", param="n")
            prompt_ids, sampling, routing = await self._read(request)
            samplings = choice_samplings(sampling, request.n or 1)
            return await start_all(self.engine, [(prompt_ids, s) for s in samplings], routing)
        except EngineBusy as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineStopped as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:
            self.engine.metrics.requests.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _read(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams, str | None]:
        """Prompt ids, sampling and routing, within the server's limits (large prompts tokenized off the loop)."""
        self.model.check_name(request.model)
        check_unicode(request.routing, "routing")
        limits, s = self.limits, request.sampling
        limits.check_stop(list(s.stop), list(s.stop_token_ids))
        limits.check_max_tokens(s.max_tokens if s.HasField("max_tokens") else None)
        kind = request.WhichOneof("prompt")
        if kind == "text":
            limits.check_text(request.text)
            prompt_ids = await self.prompts.text_ids(request.text)
        elif kind == "token_ids":
            prompt_ids = list(request.token_ids.ids)
        elif kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            limits.check_messages(messages)
            prompt_ids = await self.prompts.chat_ids(messages)
        else:
            raise ValueError("the request has no prompt: set text, token_ids or chat")
        limits.check_prompt_ids(prompt_ids)
        return prompt_ids, _sampling(request.sampling), routing_spec(request.routing or None)

    async def _check_key(self, context) -> None:
        if self.api_key is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        if not bearer_key_matches(str(metadata.get("authorization", "")), self.api_key):
            self.engine.metrics.requests.labels("unauthorized").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata 'authorization: Bearer KEY'")


class _Malformed:
    """What a request that does not parse becomes (gRPC itself would answer UNKNOWN, quoting the parser)."""

    def __init__(self, message_type: str):
        self.message = (f"the request is not a valid {message_type}: malformed protobuf, or a string field "
                        "that is not valid UTF-8")


def _parser(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            return _Malformed(message_class.DESCRIPTOR.full_name)
    return parse


async def _check_parsed(request, context) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _add_service(service: CollabDecodeService, server: grpc.aio.Server) -> None:
    """pb_grpc.add_CollabDecodeServicer_to_server, with requests that do not parse -> INVALID_ARGUMENT."""
    generate = (_parser(pb.GenerateRequest), pb.GenerateResponse.SerializeToString)
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(service.Generate, *generate),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(service.GenerateStream, *generate),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            service.GetServerInfo, _parser(pb.GetServerInfoRequest), pb.ServerInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _add_health(health_service: health.aio.HealthServicer, server: grpc.aio.Server) -> None:
    """health_pb2_grpc.add_HealthServicer_to_server, with requests that do not parse -> INVALID_ARGUMENT (its
    handlers answer UNKNOWN, quoting the parser) and List, which the servicer lacks, a plain UNIMPLEMENTED."""
    async def check(request, context):
        await _check_parsed(request, context)
        return await health_service.Check(request, context)

    async def watch(request, context):
        await _check_parsed(request, context)
        await health_service.Watch(request, context)

    async def list_services(request, context):
        await _check_parsed(request, context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "List is not served: call Check or Watch with a service")

    io = (_parser(health_pb2.HealthCheckRequest), health_pb2.HealthCheckResponse.SerializeToString)
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(check, *io),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, *io),
        "List": grpc.unary_unary_rpc_method_handler(list_services, _parser(health_pb2.HealthListRequest),
                                                    health_pb2.HealthListResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(HEALTH_SERVICE_NAME, handlers)


def _sampling(s: pb.SamplingParams) -> SamplingParams:
    """Proto sampling fields -> SamplingParams; unset optionals take SamplingParams' own defaults."""
    kwargs = {name: getattr(s, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs",
                                                  "prompt_logprobs") if s.HasField(name)}
    for name in ("temperature", "top_p"):  # float32 on the wire: 0.9 arrives as 0.8999999761...
        if name in kwargs:
            kwargs[name] = float(f"{kwargs[name]:.7g}")
    return SamplingParams(**kwargs, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                          ignore_eos=s.ignore_eos)


def _response(deltas: list[Delta], index: int = 0, usage: list[list[Delta]] | None = None) -> pb.GenerateResponse:
    """One choice's deltas as a message; `usage`: every choice's deltas so far, when this message carries it."""
    out = pb.GenerateResponse(
        index=index, prompt_logprobs=_prompt_logprobs(deltas[0].prompt_logprobs),
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        provenance=[_MODEL_ENUM[p] for d in deltas for p in d.provenance],
        logprobs=[lp for d in deltas for lp in d.logprobs],
        top_logprobs=[pb.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])
                      for d in deltas for top in d.top_logprobs],
        finish_reason=deltas[-1].finish_reason if deltas[-1].finished else "")
    if usage is not None:
        counts = protocol.usage(usage, len(usage))
        counts["cached_tokens"] = counts.pop("prompt_tokens_details")["cached_tokens"]
        out.usage.CopyFrom(pb.Usage(**{k: v for k, v in counts.items() if k != "total_tokens"}))
    return out


def _prompt_logprobs(entries: list | None) -> list[pb.PromptLogprob]:
    """Sequence.prompt_logprobs (None for the first token, then (logprob, rank, top)) as messages."""
    return [pb.PromptLogprob() if entry is None else pb.PromptLogprob(
        logprob=entry[0], rank=entry[1], top=pb.TopLogprobs(token_ids=[t for t, _ in entry[2]],
                                                            logprobs=[lp for _, lp in entry[2]]))
        for entry in entries or ()]


async def _or_unavailable(awaitable, context):
    try:
        return await awaitable
    except RequestFailed as e:
        await context.abort(_failed_status(e), str(e))


def _failed_status(e: RequestFailed) -> grpc.StatusCode:
    if isinstance(e, RequestTimedOut):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL if e.server_fault else grpc.StatusCode.UNAVAILABLE


def _version() -> str:
    try:
        return version("collab-decode")
    except PackageNotFoundError:
        return "unknown"


async def start_grpc_server(service: CollabDecodeService, host: str, port: int,
                            max_message_bytes: int = 8 << 20) -> tuple[grpc.aio.Server, int]:
    """Start the service and the standard health service on host:port (0: a free port); returns the
    server and its port. A message larger than `max_message_bytes` is refused: RESOURCE_EXHAUSTED."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes)])
    _add_service(service, server)
    health_service = health.aio.HealthServicer()
    service.health = health_service
    _add_health(health_service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):  # "" = the server as a whole
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
