"""Load generator: drives a running server at a fixed concurrency with a bounded number of requests.

    drive_server(sender, workload, num_requests, concurrency) -> Measurement

`concurrency` workers each send their next request as soon as their last one ends (a closed loop), until
`num_requests` are done. Requests are the workload's prompts as token ids, greedy, with the policy in
the `routing` extension; streamed (so the first token's arrival is seen) unless asked otherwise. Each
request's usage tells how many tokens each model wrote; its text is judged by the workload's checker.
"""

from __future__ import annotations

import asyncio
import json
import time

from collab_decode.bench.measure import Measurement, RequestResult
from collab_decode.bench.workload import Workload


class LoadError(RuntimeError):
    """The server refused or failed a request: the run's figures would be wrong."""


class RestSender:
    """/v1/completions over HTTP (httpx), streamed as server-sent events or not."""

    def __init__(self, url: str, workload: Workload, api_key: str | None = None, stream: bool = True):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=None, limits=limits)
        self.workload, self.stream = workload, stream

    async def __call__(self, i: int, policy: str) -> RequestResult:
        body = {"prompt": self.workload.request(i), "max_tokens": self.workload.max_tokens, "temperature": 0.0,
                "routing": policy, "stream": self.stream}
        sent = time.perf_counter()
        if not self.stream:
            response = await self.client.post("/v1/completions", json=body)
            answer = _checked(response.status_code, response.text)
            return _result(i, answer["choices"][0]["text"], answer["usage"], sent, None)
        pieces, usage, first = [], None, None
        async with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                _checked(response.status_code, (await response.aread()).decode())
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise LoadError(f"request {i} failed mid-stream: {chunk['error']['message']}")
                first = first or time.perf_counter()
                pieces += [c["text"] for c in chunk["choices"]]
                usage = chunk.get("usage") or usage
        return _result(i, "".join(pieces), usage, sent, first)

    async def close(self) -> None:
        await self.client.aclose()


class GrpcSender:
    """GenerateStream (or unary Generate) over gRPC."""

    def __init__(self, target: str, workload: Workload, api_key: str | None = None, stream: bool = True):
        import grpc

        from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
        from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc

        self.pb, self.channel = pb, grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.CollabDecodeStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.workload, self.stream = workload, stream

    async def __call__(self, i: int, policy: str) -> RequestResult:
        pb = self.pb
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=self.workload.request(i)), routing=policy,
                                     sampling=pb.SamplingParams(max_tokens=self.workload.max_tokens, temperature=0.0))
        sent = time.perf_counter()
        if not self.stream:
            answer = await self.stub.Generate(request, metadata=self.metadata)
            return _result(i, answer.text, _usage(answer.usage), sent, None)
        pieces, usage, first = [], None, None
        async for message in self.stub.GenerateStream(request, metadata=self.metadata):
            first = first or time.perf_counter()
            pieces.append(message.text)
            if message.HasField("usage"):
                usage = _usage(message.usage)
        return _result(i, "".join(pieces), usage, sent, first)

    async def close(self) -> None:
        await self.channel.close()


def _checked(status: int, text: str) -> dict:
    if status != 200:
        raise LoadError(f"the server answered HTTP {status}: {text[:300]}")
    return json.loads(text)


def _usage(usage) -> dict:
    return {"completion_tokens": usage.completion_tokens, "large_tokens": usage.large_tokens,
            "large_calls": usage.large_calls}


def _result(i: int, text: str, usage: dict | None, sent: float, first: float | None) -> RequestResult:
    if usage is None:
        raise LoadError(f"request {i}: the server sent no usage")
    done = time.perf_counter()
    return RequestResult(index=i, text=text, num_tokens=usage["completion_tokens"],
                         num_large_tokens=usage["large_tokens"], num_large_calls=usage["large_calls"],
                         num_catchup_tokens=0, e2e_s=done - sent, ttft_s=None if first is None else first - sent)


async def drive_server(sender, policy: str, num_requests: int, concurrency: int, progress=None) -> Measurement:
    """Requests [0, num_requests) with `concurrency` in flight; returns their timings."""
    results: list[RequestResult] = []
    next_index = iter(range(num_requests))

    async def worker():
        for i in next_index:  # one shared iterator: each index goes to exactly one worker
            results.append(await sender(i, policy))
            if progress:
                progress(len(results))

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
    seconds = time.perf_counter() - start
    return Measurement(seconds, sorted(results, key=lambda r: r.index), client_cpu_s=time.process_time() - cpu)
