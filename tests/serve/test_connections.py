"""Slow and heavy clients do not hold the server: a connection that never finishes its headers is closed
(header_timeout_s), one that stops sending its body gets 408, and a huge prompt is tokenized off the event
loop, so /health and other requests are answered meanwhile."""

from __future__ import annotations

import copy
import socket
import threading

import httpx

from collab_decode.serve.http_guard import MAX_HEADER_BYTES
from collab_decode.serve.limits import INLINE_DECODE_TOKENS

from tests.serve.conftest import PROMPT
from tests.serve.test_errors import assert_openai_error

GOOD = {"model": "demo", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
CLOSE_WAIT_S = 60  # bounds a failure only: limited_server closes after its header timeout (1 s)


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.server.port), timeout=CLOSE_WAIT_S)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Wait until the server closes the connection (True), or CLOSE_WAIT_S passes (False)."""
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection; then close our end."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return answer


def test_a_connection_that_never_finishes_its_headers_is_closed(limited_server):
    silent = connect(limited_server)  # sends nothing at all
    partial = connect(limited_server)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n")
    # while both are held open, the server answers others
    assert httpx.get(f"{limited_server.url}/health", timeout=30).status_code == 200
    assert httpx.post(f"{limited_server.url}/v1/completions", json=GOOD, timeout=60).status_code == 200
    assert closed_by_server(partial) and closed_by_server(silent)
    partial.close()
    silent.close()


def test_a_slowloris_dripping_header_bytes_is_closed(limited_server):
    """A byte of header now and then does not keep the connection: the timeout bounds all of the headers."""
    sock = connect(limited_server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
    closed = threading.Event()

    def drip():
        for _ in range(int(CLOSE_WAIT_S / 0.1)):
            try:
                sock.sendall(b"X")
            except OSError:
                break
            if closed.wait(0.1):
                break

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        assert closed_by_server(sock)
    finally:
        closed.set()
        dripper.join()
        sock.close()
    assert httpx.get(f"{limited_server.url}/health", timeout=30).status_code == 200


def test_keep_alive_connection_serves_requests_and_idle_ones_close(limited_server):
    with httpx.Client(timeout=60) as client:  # one connection, several requests, each within the timeouts
        for _ in range(3):
            assert client.post(f"{limited_server.url}/v1/completions", json=GOOD).status_code == 200
    sock = connect(limited_server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    assert closed_by_server(sock)  # then idle: closed (keep-alive timeout)
    sock.close()


def test_a_body_that_stops_arriving_is_a_408(limited_server):
    sock = connect(limited_server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer


class GatedTokenizer:
    """The server's tokenizer, held inside its call on a huge text until the test releases it. If the server
    tokenized on its event loop, the loop would be held too, and nothing else could be answered."""

    def __init__(self, inner, entered: threading.Event, release: threading.Event, gate_decode: bool = False):
        self.inner, self.entered, self.release, self.gate_decode = inner, entered, release, gate_decode

    def __call__(self, text, **kwargs):
        if len(text) > 100_000:
            self._hold()
        return self.inner(text, **kwargs)

    def decode(self, *args, **kwargs):
        if self.gate_decode:  # only a worker thread's copy: the loop's own decodes small things freely
            self._hold()
        return self.inner.decode(*args, **kwargs)

    def _hold(self):
        self.entered.set()
        self.release.wait(CLOSE_WAIT_S)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __deepcopy__(self, memo):  # each worker thread takes its own copy: gated too
        return GatedTokenizer(copy.deepcopy(self.inner, memo), self.entered, self.release, gate_decode=True)


def test_health_and_other_requests_answer_while_a_huge_prompt_is_tokenized(server, monkeypatch):
    prompts = server.server.prompts
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(prompts, "tokenizer", GatedTokenizer(prompts.tokenizer, entered, release))
    monkeypatch.setattr(prompts, "_local", threading.local())  # worker threads copy the gated one
    huge = "Ann has 352 marbles. " * 40_000  # 840k characters: under the 1M limit, far over the context
    answers: dict[str, httpx.Response] = {}
    order: list[str] = []

    def send_huge():
        answers["huge"] = httpx.post(f"{server.url}/v1/completions", json={**GOOD, "prompt": huge}, timeout=120)
        order.append("huge")

    sender = threading.Thread(target=send_huge)
    sender.start()
    try:
        assert entered.wait(CLOSE_WAIT_S), "the huge prompt never reached the tokenizer"
        health = httpx.get(f"{server.url}/health", timeout=30)
        order.append("health")
        small = httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=60)
        order.append("small")
        assert health.status_code == 200 and small.status_code == 200
        assert order == ["health", "small"]  # both answered while the huge prompt is still being tokenized
    finally:
        release.set()
        sender.join()
    error = assert_openai_error(answers["huge"], 400)  # then it is answered: too long for the context
    assert "prompt" in error["message"] and "Error" not in error["message"]


def test_a_huge_prompt_over_the_character_limit_is_refused_before_tokenizing(server, monkeypatch):
    prompts = server.server.prompts
    entered, release = threading.Event(), threading.Event()
    release.set()
    monkeypatch.setattr(prompts, "tokenizer", GatedTokenizer(prompts.tokenizer, entered, release))
    monkeypatch.setattr(prompts, "_local", threading.local())
    r = httpx.post(f"{server.url}/v1/completions", json={**GOOD, "prompt": "x" * 1_000_001}, timeout=120)
    error = assert_openai_error(r, 400, "prompt")
    assert error["code"] == "prompt_too_long" and not entered.is_set()  # the tokenizer never saw it


def test_headers_past_their_size_bound_are_a_431(limited_server):
    sock = connect(limited_server)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1))
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    big_but_allowed = {"X-Big": "a" * (MAX_HEADER_BYTES // 2)}
    assert httpx.get(f"{limited_server.url}/health", headers=big_but_allowed, timeout=30).status_code == 200


def test_health_answers_while_a_long_echo_is_decoded(server, monkeypatch):
    """echo with logprobs over many prompt tokens decodes each of them (and its alternatives): off the loop."""
    prompts = server.server.prompts
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(prompts, "tokenizer", GatedTokenizer(prompts.tokenizer, entered, release))
    monkeypatch.setattr(prompts, "_local", threading.local())
    ids = server.engine.tokenizer(PROMPT * 12, add_special_tokens=False)["input_ids"][:300]
    assert 4 * len(ids) >= INLINE_DECODE_TOKENS  # decoded on a worker thread
    body = {"model": "demo", "prompt": [ids] * 4, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    answers = {}
    sender = threading.Thread(target=lambda: answers.setdefault(
        "echo", httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)))
    sender.start()
    try:
        assert entered.wait(CLOSE_WAIT_S), "the echo was never decoded off the loop"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        assert sender.is_alive()
    finally:
        release.set()
        sender.join()
    r = answers["echo"]
    assert r.status_code == 200, r.text
    assert [len(c["logprobs"]["tokens"]) for c in r.json()["choices"]] == [301] * 4
