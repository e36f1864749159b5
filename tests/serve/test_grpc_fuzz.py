"""The gRPC service fuzzed with random and malformed messages against a real server (`limited_server`).

Every RPC (Generate, GenerateStream, GetServerInfo, and the standard health service's Check, Watch, List)
gets, by hypothesis: requests whose every field is either a good value or a wild one (int32/int64 extremes,
NaN and infinities, denormals, empty and oversized strings, unknown and path-like routing strings, out of
range token ids, odd chat roles), and raw bytes as the serialized request (random, or a good request
truncated or with bytes flipped) through a channel with identity serializers. Each call must end within
STUCK_S with OK or a documented status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED; the health service's
NOT_FOUND, UNIMPLEMENTED): never UNKNOWN or INTERNAL (an exception that escaped a handler) nor UNAVAILABLE
(the server is healthy). Afterwards: a normal request is served, nothing is in flight, every KV block is free.

Calls per RPC: COLLAB_DECODE_FUZZ_EXAMPLES (default 100; `make fuzz` sets 1000).
"""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from tests.serve.conftest import PROMPT, SMALL_LIMITS

NUM_EXAMPLES = int(os.environ.get("COLLAB_DECODE_FUZZ_EXAMPLES", "100"))
STUCK_S = 60.0
VOCAB = 447  # the demo pair's vocabulary
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
HEALTH_DOCUMENTED = DOCUMENTED | {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED}

INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)
FLOAT32 = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-45, -0.0, 3.4e38]))
# past the message size, past the prompt characters (a map keeps the strategy's repr short)
HUGE_TEXT = st.sampled_from([SMALL_LIMITS.max_body_bytes + 1, SMALL_LIMITS.max_prompt_chars + 1]).map(lambda n: "x" * n)
WILD_TEXT = st.one_of(st.text(max_size=30), st.just(""), HUGE_TEXT)
TEXT = st.one_of(st.sampled_from([PROMPT, "Ann has", "12 + 7 ="]), st.text(min_size=1, max_size=40))
TOKEN = st.integers(0, VOCAB - 1)


# Each field: a good value and a wild one. A request is all good, or good but for one wild field, or each
# field wild one time in four: most requests reach the engine, each wild value is tried alone and together.
GOOD_MESSAGE = st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant"]), content=TEXT)
WILD_MESSAGE = st.builds(pb.ChatMessage, role=WILD_TEXT, content=st.one_of(TEXT, WILD_TEXT))
FIELDS = {  # name: (good, wild); "sampling.*" are SamplingParams fields
    "prompt": (st.one_of(st.fixed_dictionaries({"text": TEXT}), st.fixed_dictionaries({"token_ids": st.builds(
        pb.TokenIds, ids=st.lists(TOKEN, min_size=1, max_size=30))}), st.fixed_dictionaries({"chat": st.builds(
            pb.Chat, messages=st.lists(GOOD_MESSAGE, min_size=1, max_size=3))})),
               st.one_of(st.fixed_dictionaries({"text": WILD_TEXT}), st.fixed_dictionaries({"token_ids": st.builds(
                   pb.TokenIds, ids=st.lists(INT32, max_size=200))}), st.fixed_dictionaries({"chat": st.builds(
                       pb.Chat, messages=st.lists(st.one_of(GOOD_MESSAGE, WILD_MESSAGE), max_size=10))}),
                   st.just({}))),  # no prompt at all
    "model": (st.sampled_from(["", "demo"]), WILD_TEXT),
    "routing": (st.sampled_from(["", "small", "large", "entropy:0.3", "confidence:0.8", "step-entropy:1.0",
                                 "random:0.5", "speculative:3"]),
                st.one_of(WILD_TEXT, st.sampled_from(["neural", "neural:/etc/passwd", "entropy:nan", "entropy:inf",
                                                      "speculative:99999999999", "random:-1", "small:", ":"]))),
    "n": (st.integers(0, 3), INT32),
    "sampling.max_tokens": (st.integers(1, SMALL_LIMITS.max_output_tokens), INT32),
    "sampling.temperature": (st.floats(0, 2, width=32), FLOAT32),
    "sampling.top_p": (st.floats(0.125, 1, width=32), FLOAT32),
    "sampling.top_k": (st.integers(0, 50), INT32),
    "sampling.seed": (st.integers(0, 2**32), INT64),
    "sampling.stop": (st.lists(st.text(min_size=1, max_size=4), max_size=3), st.lists(WILD_TEXT, max_size=20)),
    "sampling.stop_token_ids": (st.lists(TOKEN, max_size=3), st.lists(INT32, max_size=20)),
    "sampling.ignore_eos": (st.booleans(), st.booleans()),
    "sampling.logprobs": (st.integers(0, 5), INT32),
    "sampling.prompt_logprobs": (st.integers(0, 5), INT32),
}
REQUIRED = ("prompt", "model", "routing", "n")


def _fields(pick) -> st.SearchStrategy[dict]:
    """Every field, its value drawn from `pick((good, wild))`; sampling fields may be left unset."""
    return st.fixed_dictionaries({k: pick(v) for k, v in FIELDS.items() if k in REQUIRED},
                                 optional={k: pick(v) for k, v in FIELDS.items() if k not in REQUIRED})


def _one_wild() -> st.SearchStrategy[dict]:
    wild = st.sampled_from(sorted(FIELDS)).flatmap(lambda k: st.tuples(st.just(k), FIELDS[k][1]))
    return st.tuples(_fields(lambda v: v[0]), wild).map(lambda drawn: {**drawn[0], drawn[1][0]: drawn[1][1]})


def _message(fields: dict) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(**{k.removeprefix("sampling."): v for k, v in fields.items() if "." in k})
    return pb.GenerateRequest(**fields["prompt"], model=fields["model"], routing=fields["routing"], n=fields["n"],
                              sampling=sampling)


REQUEST = st.one_of(_fields(lambda v: v[0]), _one_wild(), _one_wild(),
                    _fields(lambda v: st.one_of(v[0], v[0], v[0], v[1]))).map(_message)


def corrupted(message_bytes: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Serialized messages cut short or with a few bytes overwritten, or random bytes."""
    def damage(drawn):
        data, cut, flips = drawn
        data = bytearray(data[:cut] if cut < len(data) else data)
        for position, value in flips:
            if data:
                data[position % len(data)] = value
        return bytes(data)
    return st.one_of(st.binary(max_size=200), st.tuples(message_bytes, st.integers(0, 300), st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4)).map(damage))


RAW_GENERATE = corrupted(REQUEST.map(lambda r: r.SerializeToString()))
RAW_HEALTH = corrupted(st.builds(health_pb2.HealthCheckRequest, service=st.sampled_from(
    ["", "collab_decode.v1.CollabDecode", "nope"])).map(lambda r: r.SerializeToString()))

SETTINGS = settings(max_examples=NUM_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
GENERATE = "/collab_decode.v1.CollabDecode/Generate"
GENERATE_STREAM = "/collab_decode.v1.CollabDecode/GenerateStream"


def outcome(call) -> grpc.StatusCode:
    """Run a call to its end (every message of a stream); its status, after checking what an OK one sent."""
    try:
        result = call()
    except grpc.RpcError as e:
        return e.code()
    if isinstance(result, pb.GenerateResponse):
        assert result.finish_reason in ("stop", "length"), result
    elif isinstance(result, list) and result and isinstance(result[0], pb.GenerateResponse):
        assert sum(m.finish_reason in ("stop", "length") for m in result) >= 1, result[-1]
    return grpc.StatusCode.OK


def assert_documented(code: grpc.StatusCode, documented: set, what) -> None:
    assert code in documented, f"{code.name} for {what!r}"


@pytest.fixture(scope="module")
def channel(limited_server):
    with grpc.insecure_channel(limited_server.grpc_target) as channel:
        yield channel


@pytest.fixture(autouse=True)
def still_serves(limited_server, channel):
    """After each test: a normal request is served, nothing is in flight, every KV block is free."""
    yield
    good = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=2, temperature=0))
    generate = channel.unary_unary(GENERATE, pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString)
    assert generate(good, timeout=STUCK_S).usage.completion_tokens == 2
    limited_server.wait_idle(timeout=STUCK_S)


@pytest.mark.parametrize("method", [GENERATE, GENERATE_STREAM])
def test_random_generate_requests_get_documented_statuses(channel, method):
    serialize, parse = pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString
    unary = channel.unary_unary(method, serialize, parse)
    stream = channel.unary_stream(method, serialize, parse)

    @SETTINGS
    @given(request=REQUEST)
    def fuzz(request):
        if method == GENERATE:
            code = outcome(lambda: unary(request, timeout=STUCK_S))
        else:
            code = outcome(lambda: list(stream(request, timeout=STUCK_S)))
        assert_documented(code, DOCUMENTED, request)

    fuzz()


@pytest.mark.parametrize("method", [GENERATE, GENERATE_STREAM, "/collab_decode.v1.CollabDecode/GetServerInfo"])
def test_malformed_bytes_get_documented_statuses(channel, method):
    unary, stream = channel.unary_unary(method), channel.unary_stream(method)  # bytes in, bytes out

    @SETTINGS
    @given(data=RAW_GENERATE)
    def fuzz(data):
        call = (lambda: list(stream(data, timeout=STUCK_S))) if method == GENERATE_STREAM else \
            (lambda: unary(data, timeout=STUCK_S))
        assert_documented(outcome(call), DOCUMENTED, data)
        if method == GENERATE and _parses(data, pb.GenerateRequest) is None:
            with pytest.raises(grpc.RpcError) as e:
                unary(data, timeout=STUCK_S)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in e.value.details()

    fuzz()


@pytest.mark.parametrize("method", ["Check", "Watch", "List"])
def test_health_service_with_malformed_bytes(channel, method):
    path = f"/grpc.health.v1.Health/{method}"
    unary, stream = channel.unary_unary(path), channel.unary_stream(path)

    @SETTINGS
    @given(data=RAW_HEALTH)
    def fuzz(data):
        if method != "Watch":
            code = outcome(lambda: unary(data, timeout=STUCK_S))
        else:  # a Watch that parsed never ends by itself: its first message is the answer
            call = stream(data, timeout=STUCK_S)
            code = outcome(lambda: next(call))
            call.cancel()
        assert_documented(code, HEALTH_DOCUMENTED, data)

    fuzz()


def test_more_choices_than_the_server_holds_is_invalid_argument(limited_server, channel):
    """Found by the fuzzing: n past max_queue was RESOURCE_EXHAUSTED, which clients retry, though it can never
    be admitted (REST answers 400)."""
    stream = channel.unary_stream(GENERATE_STREAM, pb.GenerateRequest.SerializeToString, pb.GenerateResponse.FromString)
    n = limited_server.server.engine.max_queue + 1
    with pytest.raises(grpc.RpcError) as e:
        list(stream(pb.GenerateRequest(text=PROMPT, n=n), timeout=STUCK_S))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_queue" in e.value.details()


def _parses(data: bytes, message_class):
    try:
        return message_class.FromString(data)
    except DecodeError:
        return None
