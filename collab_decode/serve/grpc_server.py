"""The gRPC API (protos/collab_decode/v1/collab_decode.proto): a thin grpc.aio adapter over AsyncEngine.

Generate collects a request's deltas into one response; GenerateStream sends each delta as it comes.
Bad input -> INVALID_ARGUMENT, past the queue bound -> RESOURCE_EXHAUSTED, a request a model could not
run (the large model's endpoint is down) -> UNAVAILABLE, no or wrong key (metadata
`authorization: Bearer KEY`) -> UNAUTHENTICATED. A cancelled call (client gone, deadline) cancels its
handler, whose `async with stream` aborts the sequence. The standard health service runs beside it.
"""

from __future__ import annotations

import hmac
from importlib.metadata import PackageNotFoundError, version

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collab_decode.routing import POLICY_NAMES
from collab_decode.sampling import SamplingParams
from collab_decode.serve.async_engine import AsyncEngine, Delta, EngineBusy, EngineStopped, RequestFailed, RequestStream
from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from collab_decode.serve.requests import ServedModel, chat_prompt_ids, routing_spec, text_prompt_ids

SERVICE_NAME = "collab_decode.v1.CollabDecode"
_MODEL_ENUM = {"small": pb.MODEL_SMALL, "large": pb.MODEL_LARGE}


class CollabDecodeService(pb_grpc.CollabDecodeServicer):
    def __init__(self, engine: AsyncEngine, model: ServedModel, tokenizer, api_key: str | None = None):
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer  # the loop's own copy (the engine thread decodes with the engine's)
        self.api_key = api_key

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        stream = await self._start(request, context)
        async with stream:
            deltas = await _or_unavailable(stream.collect(), context)
        return _response(deltas, with_usage=True)

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        stream = await self._start(request, context)
        async with stream:
            deltas = []
            try:
                async for delta in stream:
                    deltas.append(delta)
                    yield _response([delta], with_usage=delta.finished, usage_deltas=deltas)
            except RequestFailed as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        await self._check_key(context)
        engine = self.engine.engine
        return pb.ServerInfo(model=self.model.name, small_model=self.model.small_dir,
                             large_model=self.model.large_dir or "", default_policy=engine.config.default_policy,
                             policies=list(POLICY_NAMES), max_model_len=engine.max_model_len,
                             max_queue=self.engine.max_queue, version=_version())

    async def _start(self, request: pb.GenerateRequest, context) -> RequestStream:
        """Check the key, read the request, add it to the engine; aborts the call with the right status."""
        await self._check_key(context)
        try:
            prompt_ids, sampling, routing = self._read(request)
            return await self.engine.add_request(prompt_ids, sampling, routing)
        except EngineBusy as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineStopped as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:
            self.engine.metrics.requests.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _read(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams, str | None]:
        self.model.check_name(request.model)
        kind = request.WhichOneof("prompt")
        if kind == "text":
            prompt_ids = text_prompt_ids(self.tokenizer, request.text)
        elif kind == "token_ids":
            prompt_ids = list(request.token_ids.ids)
        elif kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            prompt_ids = chat_prompt_ids(self.tokenizer, messages)
        else:
            raise ValueError("the request has no prompt: set text, token_ids or chat")
        return prompt_ids, _sampling(request.sampling), routing_spec(request.routing or None)

    async def _check_key(self, context) -> None:
        if self.api_key is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get("authorization", "")).removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            self.engine.metrics.requests.labels("unauthorized").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata 'authorization: Bearer KEY'")


def _sampling(s: pb.SamplingParams) -> SamplingParams:
    """Proto sampling fields -> SamplingParams; unset optionals take SamplingParams' own defaults."""
    kwargs = {name: getattr(s, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs")
              if s.HasField(name)}
    for name in ("temperature", "top_p"):  # float32 on the wire: 0.9 arrives as 0.8999999761...
        if name in kwargs:
            kwargs[name] = float(f"{kwargs[name]:.7g}")
    return SamplingParams(**kwargs, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                          ignore_eos=s.ignore_eos)


def _response(deltas: list[Delta], with_usage: bool, usage_deltas: list[Delta] | None = None) -> pb.GenerateResponse:
    out = pb.GenerateResponse(
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        provenance=[_MODEL_ENUM[p] for d in deltas for p in d.provenance],
        logprobs=[lp for d in deltas for lp in d.logprobs],
        top_logprobs=[pb.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])
                      for d in deltas for top in d.top_logprobs],
        finish_reason=deltas[-1].finish_reason if deltas[-1].finished else "")
    if with_usage:
        out.usage.CopyFrom(_usage(usage_deltas or deltas))
    return out


def _usage(deltas: list[Delta]) -> pb.Usage:
    last = deltas[-1]
    return pb.Usage(prompt_tokens=last.num_prompt_tokens, completion_tokens=sum(len(d.token_ids) for d in deltas),
                    small_tokens=last.stats["small_tokens"], large_tokens=last.stats["large_tokens"],
                    large_share=last.stats["large_share"], large_calls=last.stats["large_calls"])


async def _or_unavailable(awaitable, context):
    try:
        return await awaitable
    except RequestFailed as e:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


def _version() -> str:
    try:
        return version("collab-decode")
    except PackageNotFoundError:
        return "unknown"


async def start_grpc_server(service: CollabDecodeService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the service and the standard health service on host:port (0: a free port); returns the
    server and its port."""
    server = grpc.aio.server()
    pb_grpc.add_CollabDecodeServicer_to_server(service, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):  # "" = the server as a whole
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
