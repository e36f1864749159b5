"""A gRPC client built from protos/ against the real server: unary and streaming generate, server info,
standard health, error statuses, cancellation, API key and queue bound."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collab_decode.sampling import SamplingParams
from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from tests.serve.conftest import API_KEY, DEFAULT_POLICY, PROMPT

MAX_TOKENS = 16
SOURCES = {pb.MODEL_SMALL: "small", pb.MODEL_LARGE: "large"}


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.CollabDecodeStub(channel)


def greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


def test_generate_equals_engine(stub, reference_engine):
    want = reference_engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                                     DEFAULT_POLICY)[0]
    got = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=greedy()), timeout=60)
    assert got.text == want.text
    assert list(got.token_ids) == want.token_ids
    assert [SOURCES[p] for p in got.provenance] == want.provenance
    assert got.finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.large_tokens == want.stats["large_tokens"]
    assert got.usage.large_share == pytest.approx(want.stats["large_share"])


def test_generate_stream_equals_unary(stub):
    request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=PROMPT)]),
                                 sampling=greedy(logprobs=2), routing="entropy:0.3")
    whole = stub.Generate(request, timeout=60)
    parts = list(stub.GenerateStream(request, timeout=60))
    assert "".join(p.text for p in parts) == whole.text
    assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
    assert [s for p in parts for s in p.provenance] == list(whole.provenance)
    assert len(whole.logprobs) == len(whole.top_logprobs) == len(whole.token_ids)
    assert all(len(top.token_ids) == 2 for top in whole.top_logprobs)
    assert all(not p.finish_reason and not p.HasField("usage") for p in parts[:-1])
    assert parts[-1].finish_reason == whole.finish_reason
    assert parts[-1].usage == whole.usage


def test_token_id_prompt(stub, reference_engine):
    ids = reference_engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    by_ids = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=greedy(4)), timeout=60)
    by_text = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=greedy(4)), timeout=60)
    assert by_ids.token_ids == by_text.token_ids and by_ids.usage.prompt_tokens == len(ids)


def test_server_info_and_health(stub, channel):
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.model == "demo" and info.default_policy == DEFAULT_POLICY and info.max_model_len == 512
    assert "speculative" in info.policies and info.large_model
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "collab_decode.v1.CollabDecode"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


BAD_REQUESTS = {
    "no prompt": pb.GenerateRequest(sampling=greedy()),
    "empty prompt": pb.GenerateRequest(text="", sampling=greedy()),
    "max_tokens zero": pb.GenerateRequest(text=PROMPT, sampling=greedy(0)),
    "max_tokens negative": pb.GenerateRequest(text=PROMPT, sampling=greedy(-5)),
    "max_tokens huge": pb.GenerateRequest(text=PROMPT, sampling=greedy(10**9)),
    "prompt too long": pb.GenerateRequest(text="one two " * 400, sampling=greedy()),
    "unknown policy": pb.GenerateRequest(text=PROMPT, sampling=greedy(), routing="oracle:0.3"),
    "threshold out of range": pb.GenerateRequest(text=PROMPT, sampling=greedy(), routing="confidence:2"),
    "unknown model": pb.GenerateRequest(model="gpt-5", text=PROMPT, sampling=greedy()),
    "bad chat role": pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="x", content="hi")])),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_bad_request_is_invalid_argument_then_good_one(stub, case, method):
    with pytest.raises(grpc.RpcError) as e:
        result = getattr(stub, method)(BAD_REQUESTS[case], timeout=60)
        if method == "GenerateStream":
            list(result)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details()
    assert stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=greedy(2)), timeout=60).usage.completion_tokens == 2


def test_cancelled_stream_frees_its_blocks(stub, server):
    before = server.wait_idle()
    call = stub.GenerateStream(pb.GenerateRequest(text=PROMPT, sampling=greedy(400, ignore_eos=True)), timeout=60)
    for i, _ in enumerate(call):
        if i == 2:
            break
    call.cancel()
    after = server.wait_idle()
    key = 'collab_decode_requests_total{outcome="abort"}'
    assert after[key] - before.get(key, 0) == 1


def test_api_key_and_queue_bound(guarded_server):
    with grpc.insecure_channel(guarded_server.grpc_target) as ch:
        stub = pb_grpc.CollabDecodeStub(ch)
        request = pb.GenerateRequest(text=PROMPT, sampling=greedy(2))
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(request, metadata=metadata, timeout=60)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key = (("authorization", f"Bearer {API_KEY}"),)
        assert stub.Generate(request, metadata=key, timeout=60).usage.completion_tokens == 2
        long = pb.GenerateRequest(text=PROMPT, sampling=greedy(400, ignore_eos=True))
        calls = [stub.GenerateStream(long, metadata=key, timeout=60) for _ in range(2)]
        for call in calls:
            next(call)  # both admitted: the bound (2) is reached
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request, metadata=key, timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:
            call.cancel()
        guarded_server.wait_idle()
        assert stub.Generate(request, metadata=key, timeout=60).usage.completion_tokens == 2
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health needs no key
