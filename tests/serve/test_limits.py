"""The server's limits (serve/limits.py, serve/http_guard.py) against a real server with small ones: each is
answered with its OpenAI-style error (413 for the body, 400 otherwise; gRPC RESOURCE_EXHAUSTED or
INVALID_ARGUMENT), the request just under it is served, and the server serves a good request after.
Also: text that is not valid Unicode is a 400, and the request timeout ends a request and frees its blocks."""

from __future__ import annotations

import json
import socket

import grpc
import httpx
import pytest

from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from tests.serve.conftest import PROMPT, SMALL_LIMITS, assert_dropped_by_engine
from tests.serve.test_errors import assert_openai_error

L = SMALL_LIMITS
GOOD = {"model": "demo", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "temperature": 0}


def post(server, body, path: str = "/v1/completions", **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


def assert_serves(server) -> None:
    r = post(server, GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def raw_request(server, head: bytes, body: bytes) -> bytes:
    """Send bytes as they are; return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=60) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def status_and_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


# ---- body size ------------------------------------------------------------------------------------
def test_body_over_the_limit_by_content_length_is_413(limited_server):
    filler = "x" * L.max_body_bytes
    r = post(limited_server, {**GOOD, "user": filler})
    error = assert_openai_error(r, 413)
    assert error["code"] == "request_too_large" and str(L.max_body_bytes) in error["message"]
    assert r.headers["x-request-id"]
    just_under = {**GOOD, "user": "x" * (L.max_body_bytes - 1000)}
    assert post(limited_server, just_under).status_code == 200
    assert_serves(limited_server)


def test_chunked_body_without_content_length_is_counted(limited_server):
    body = json.dumps({**GOOD, "user": "x" * (L.max_body_bytes + 1000)}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192]) for i in range(0, len(body), 8192))
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    status, error = status_and_error(raw_request(limited_server, head, chunks + b"0\r\n\r\n"))
    assert status == 413 and error["code"] == "request_too_large"
    small = json.dumps(GOOD).encode()  # the same framing under the limit is served
    status_line = raw_request(limited_server, head.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n"),
                              b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)).split(b"\r\n")[0]
    assert status_line == b"HTTP/1.1 200 OK"
    assert_serves(limited_server)


def test_grpc_message_over_the_limit_is_resource_exhausted(limited_server):
    with grpc.insecure_channel(limited_server.grpc_target) as channel:
        stub = pb_grpc.CollabDecodeStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(text="x" * (L.max_body_bytes + 1)), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=2)), timeout=60)
        assert ok.usage.completion_tokens == 2


# ---- request fields -------------------------------------------------------------------------------
LONG_TEXT = "Ann has 352 marbles. " * 30  # 630 characters: under max_prompt_chars, over 100 tokens

OVER_LIMITS = {
    "prompt characters": ("/v1/completions", {**GOOD, "prompt": "x" * (L.max_prompt_chars + 1)}, "prompt",
                          "prompt_too_long"),
    "prompt tokens (text)": ("/v1/completions", {**GOOD, "prompt": LONG_TEXT}, "prompt", "prompt_too_long"),
    "prompt tokens (ids)": ("/v1/completions", {**GOOD, "prompt": [5] * (L.max_prompt_tokens + 1)}, "prompt",
                            "prompt_too_long"),
    "max_tokens": ("/v1/completions", {**GOOD, "max_tokens": L.max_output_tokens + 1}, "max_tokens", None),
    "stop strings": ("/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d"]}, "stop", None),
    "stop string length": ("/v1/completions", {**GOOD, "stop": "y" * (L.max_stop_chars + 1)}, "stop", None),
    "stop token ids": ("/v1/completions", {**GOOD, "stop_token_ids": [1, 2, 3, 4]}, "stop_token_ids", None),
    "messages": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi"}] * 5},
                 "messages", None),
    "message characters": ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "x" * 1500}, {"role": "user", "content": "x" * 501}]}, "messages",
        "prompt_too_long"),
    "chat prompt tokens": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG_TEXT}]},
                           "messages", "prompt_too_long"),
    "max_completion_tokens": ("/v1/chat/completions", {**CHAT, "max_completion_tokens": L.max_output_tokens + 1},
                              "max_completion_tokens", None),
}


@pytest.mark.parametrize("case", list(OVER_LIMITS))
def test_each_limit_is_a_400_naming_the_field(limited_server, case):
    path, body, param, code = OVER_LIMITS[case]
    error = assert_openai_error(post(limited_server, body, path), 400, param)
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert_serves(limited_server)


def test_requests_at_the_limits_are_served(limited_server):
    at_limits = {**GOOD, "max_tokens": L.max_output_tokens, "stop": ["q" * L.max_stop_chars, "zz", "zzz"],
                 "stop_token_ids": [1000, 1001, 1002], "prompt": [5] * L.max_prompt_tokens, "ignore_eos": True}
    r = post(limited_server, at_limits)
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {**r.json()["usage"], "prompt_tokens": L.max_prompt_tokens,
                                 "completion_tokens": L.max_output_tokens}
    messages = [{"role": "user", "content": "hi"}] * L.max_messages
    assert post(limited_server, {**CHAT, "messages": messages}, "/v1/chat/completions").status_code == 200


def test_chat_without_max_tokens_stops_at_the_servers_cap(limited_server):
    r = post(limited_server, {"messages": CHAT["messages"], "ignore_eos": True}, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == L.max_output_tokens
    assert r.json()["choices"][0]["finish_reason"] == "length"


GRPC_OVER_LIMITS = {
    "prompt characters": pb.GenerateRequest(text="x" * (L.max_prompt_chars + 1)),
    "prompt tokens": pb.GenerateRequest(text=LONG_TEXT),
    "max_tokens": pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=L.max_output_tokens + 1)),
    "stop strings": pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(stop=["a", "b", "c", "d"])),
    "stop string length": pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(stop=["y" * 11])),
    "messages": pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")] * 5)),
}


@pytest.mark.parametrize("case", list(GRPC_OVER_LIMITS))
def test_grpc_limits_are_invalid_argument(limited_server, case):
    with grpc.insecure_channel(limited_server.grpc_target) as channel:
        stub = pb_grpc.CollabDecodeStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GenerateStream(GRPC_OVER_LIMITS[case], timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "at most" in e.value.details() or "must be <=" in e.value.details()


# ---- invalid Unicode ------------------------------------------------------------------------------
LONE = "\\ud800"  # as it appears in the JSON text: an escape that decodes to a lone surrogate
HOSTILE_UNICODE = {
    "prompt": b'{"prompt": "ab%s", "max_tokens": 2}' % LONE.encode(),
    "message content": b'{"messages": [{"role": "user", "content": "%s"}], "max_tokens": 2}' % LONE.encode(),
    "message role": b'{"messages": [{"role": "user%s", "content": "hi"}], "max_tokens": 2}' % LONE.encode(),
    "stop string": b'{"prompt": "hi", "stop": ["%s"], "max_tokens": 2}' % LONE.encode(),
    "model name": b'{"model": "%s", "prompt": "hi", "max_tokens": 2}' % LONE.encode(),
    "low surrogate alone": b'{"prompt": "\\udc00", "max_tokens": 2}',
    "raw invalid UTF-8": b'{"prompt": "ab\xff\xfe", "max_tokens": 2}',
    "truncated UTF-8 sequence": b'{"prompt": "ab\xe2\x82", "max_tokens": 2}',
    "deep in an ignored field": b'{"prompt": "hi", "max_tokens": 2, "x": %s"%s"%s}' % (b"[" * 900, LONE.encode(),
                                                                                      b"]" * 900),
}


@pytest.mark.parametrize("case", list(HOSTILE_UNICODE))
def test_invalid_unicode_is_a_400_without_internals(server, case):
    body = HOSTILE_UNICODE[case]
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    error = assert_openai_error(r, 400)
    assert error["code"] == "invalid_unicode"
    assert "Error" not in error["message"] and "Traceback" not in error["message"]
    assert_serves(server)


def test_a_valid_surrogate_pair_is_text(server):
    body = b'{"prompt": "Ann has \\ud83d\\ude00 352 marbles.", "max_tokens": 2, "stop": ["\\ud83d\\ude00"]}'
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_a_huge_wrong_typed_input_is_not_echoed_back_whole(server):
    error = assert_openai_error(post(server, {**GOOD, "prompt": [["x"] * 100_000]}), 400, "prompt")
    assert len(error["message"]) < 1000


# ---- request ids and internal errors --------------------------------------------------------------
def test_every_response_carries_a_request_id(server):
    responses = [httpx.get(f"{server.url}/health"), httpx.get(f"{server.url}/nothing"),
                 post(server, {**GOOD, "max_tokens": 0}), post(server, GOOD)]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids)
    mine = post(server, GOOD, headers={"x-request-id": "trace-42.a:b"})
    assert mine.headers["x-request-id"] == "trace-42.a:b"  # a sane id the client sent is kept
    for insane in ("has spaces", "x" * 200, "semi;colon"):
        r = httpx.get(f"{server.url}/health", headers={"x-request-id": insane})
        assert r.headers["x-request-id"] != insane and len(r.headers["x-request-id"]) == 32


def test_an_internal_error_is_logged_with_its_request_id_and_not_shown(server, monkeypatch, caplog):
    """A fault injected into the engine's context lookup (no request reaches one otherwise)."""
    def broken(num_prompt_tokens):
        raise RuntimeError("secret detail at /home/ops/models/large")

    monkeypatch.setattr(server.engine, "max_tokens_left", broken)
    caplog.set_level("ERROR", logger="collab_decode.serve.openai_api")
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": CHAT["messages"]},
                   headers={"x-request-id": "fault-1"}, timeout=60)
    error = assert_openai_error(r, 500)
    assert "secret" not in r.text and "/home" not in r.text and "RuntimeError" not in r.text
    assert "fault-1" in error["message"] and r.headers["x-request-id"] == "fault-1"
    logged = [rec for rec in caplog.records if "fault-1" in rec.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])
    monkeypatch.undo()
    assert_serves(server)


# ---- request timeout ------------------------------------------------------------------------------
def test_request_timeout_ends_the_request_and_frees_its_blocks(limited_server, limited_gate, monkeypatch):
    monkeypatch.setattr(limited_server.server.engine, "request_timeout_s", 1.0)
    engine = limited_server.engine
    long = {**GOOD, "max_tokens": 30, "ignore_eos": True}

    limited_gate.pause(lambda e: any(s.num_output_tokens >= 1 for s in e.seqs.values()))  # never finishes
    r = post(limited_server, long)
    error = assert_openai_error(r, 504)
    assert error["code"] == "request_timeout" and "1 s" in error["message"]
    (seq,) = limited_gate.wait_paused()
    assert_dropped_by_engine(engine, seq)

    limited_gate.resume(until=lambda e: any(s.num_output_tokens >= 1 for s in e.seqs.values()))
    with httpx.stream("POST", f"{limited_server.url}/v1/completions", json={**long, "stream": True},
                      timeout=60) as stream:
        lines = [line for line in stream.iter_lines() if line]
    (seq,) = limited_gate.wait_paused()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert_dropped_by_engine(engine, seq)

    limited_gate.resume(until=lambda e: any(s.num_output_tokens >= 1 for s in e.seqs.values()))
    with grpc.insecure_channel(limited_server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.CollabDecodeStub(channel).Generate(pb.GenerateRequest(
                text=PROMPT, sampling=pb.SamplingParams(max_tokens=30, ignore_eos=True)), timeout=60)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (seq,) = limited_gate.wait_paused()
    assert_dropped_by_engine(engine, seq)
    limited_gate.resume()
    limited_server.wait_idle()
    assert_serves(limited_server)


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff not protobuf", pb.GenerateRequest(text="hello").SerializeToString()
                                     .replace(b"hello", b"he\xffxo")], ids=["corrupt", "invalid UTF-8 string"])
def test_grpc_message_that_does_not_parse_is_invalid_argument(server, garbage):
    with grpc.insecure_channel(server.grpc_target) as channel:
        raw = channel.unary_unary("/collab_decode.v1.CollabDecode/Generate")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as e:
            raw(garbage, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "DecodeError" not in e.value.details() and "not a valid" in e.value.details()
        ok = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=2)).SerializeToString()
        assert pb.GenerateResponse.FromString(raw(ok, timeout=60)).usage.completion_tokens == 2
