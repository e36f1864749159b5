"""The remote backend's transport and its translation of completions into logits, against scripted endpoints
(httpx.MockTransport: no sockets): retries with backoff, no retry of the request's own errors, the circuit
breaker and its recovery probe, concurrent calls, and the rows the backend builds from vLLM-format answers."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from collab_decode.backends.base import BackendError, ModelInput, SeqChunk
from collab_decode.backends.remote import RemoteBackend, RemoteConfig
from collab_decode.backends.remote_client import RemoteCallError, RemoteClient


class Script:
    """An endpoint whose /v1/completions answers come from `answer(body)`; /health from `healthy`."""

    def __init__(self, answer):
        self.answer = answer
        self.healthy = True
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        import asyncio
        import json

        if request.url.path == "/health":
            return httpx.Response(200 if self.healthy else 503)
        body = json.loads(request.content)
        with self._lock:
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        with self._lock:
            self.in_flight -= 1
        return self.answer(body)


def client_for(script: Script, **kw) -> RemoteClient:
    kw = {"backoff_s": 0.001, "probe_interval_s": 0.02, **kw}
    return RemoteClient("http://endpoint", transport=httpx.MockTransport(script), **kw)


def ok(body: dict) -> httpx.Response:
    return httpx.Response(200, json={"echo": body["prompt"]})


def test_calls_go_out_concurrently_and_answer_in_order():
    script = Script(ok)
    client = client_for(script, max_concurrency=8)
    answers = client.post_many("/v1/completions", [{"prompt": [i]} for i in range(16)])
    assert [a["echo"] for a in answers] == [[i] for i in range(16)]
    assert 1 < script.max_in_flight <= 8
    client.close()


def test_transient_errors_are_retried_request_errors_are_not():
    attempts = {"n": 0}

    def flaky(body):
        attempts["n"] += 1
        if body["prompt"] == ["bad"]:
            return httpx.Response(400, json={"error": {"message": "prompt is too long"}})
        return httpx.Response(503, text="busy") if attempts["n"] < 3 else ok(body)

    client = client_for(Script(flaky), max_retries=2)
    assert client.post_many("/v1/completions", [{"prompt": [1]}])[0] == {"echo": [1]}  # third try
    attempts["n"] = 0
    error = client.post_many("/v1/completions", [{"prompt": ["bad"]}])[0]
    assert isinstance(error, RemoteCallError) and not error.retryable and attempts["n"] == 1
    assert "HTTP 400: prompt is too long" in str(error)
    assert not client.circuit.is_open  # the endpoint is fine: the request was at fault
    client.close()


def test_circuit_opens_fails_fast_and_closes_when_the_endpoint_answers_again():
    script = Script(lambda body: httpx.Response(502, text="gateway down"))
    script.healthy = False
    client = client_for(script, max_retries=1, failure_threshold=2)
    errors = client.post_many("/v1/completions", [{"prompt": [1]}, {"prompt": [2]}])
    assert all(isinstance(e, RemoteCallError) for e in errors)
    assert client.circuit.is_open and "http://endpoint unavailable" in client.unavailable()
    num_sent = len(script.bodies)
    start = time.monotonic()
    error = client.post_many("/v1/completions", [{"prompt": [3]}])[0]
    assert isinstance(error, RemoteCallError) and "unavailable" in str(error)
    assert len(script.bodies) == num_sent and time.monotonic() - start < 1  # failed at once, nothing sent
    script.answer, script.healthy = ok, True  # the endpoint returns: the probe closes the circuit
    deadline = time.monotonic() + 10
    while client.circuit.is_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.unavailable() is None
    assert client.post_many("/v1/completions", [{"prompt": [4]}])[0] == {"echo": [4]}
    client.close()


def test_connection_refused_counts_as_endpoint_down():
    client = RemoteClient("http://127.0.0.1:9", max_retries=1, backoff_s=0.001, failure_threshold=1,
                          probe_interval_s=60)
    error = client.post_many("/v1/completions", [{"prompt": [1]}])[0]
    assert isinstance(error, RemoteCallError) and error.retryable and "ConnectError" in str(error)
    assert client.circuit.is_open
    client.close()


# ---- the backend's rows -------------------------------------------------------------------------
VOCAB = 12


def completion(body: dict) -> httpx.Response:
    """vLLM's answer shape: the next token's top logprobs named "token_id:ID"; prompt_logprobs keyed by id.
    The scripted model likes token (last + 1) % VOCAB."""
    ids = body["prompt"]

    def top(after: int) -> dict[int, float]:
        return {(after + 1) % VOCAB: -0.1, (after + 2) % VOCAB: -2.5, (after + 3) % VOCAB: -4.0}

    choice = {"text": "", "logprobs": {"top_logprobs": [{f"token_id:{t}": lp for t, lp in top(ids[-1]).items()}]}}
    if "prompt_logprobs" in body:
        choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": lp, "rank": r + 1} for r, (t, lp) in
                                               enumerate(top(ids[i - 1]).items())} for i in range(1, len(ids))]
    return httpx.Response(200, json={"choices": [choice]})


def backend_for(script: Script) -> RemoteBackend:
    return RemoteBackend(client_for(script, failure_threshold=100), "m", VOCAB, 64, logprobs=3)


def test_backend_sends_whole_sequences_and_builds_top_k_rows():
    script = Script(completion)
    backend = backend_for(script)
    out = backend.forward(ModelInput([SeqChunk(1, [3, 4, 5], 0, []), SeqChunk(2, [7], 0, [])]))
    assert out.logits.shape == (2, VOCAB) and out.hidden.shape == (2, 0)
    assert out.logits.argmax(-1).tolist() == [6, 8]
    assert out.logits[0, 7] == pytest.approx(-2.5) and torch.isinf(out.logits[0, 0])
    # catch-up: the next chunk sends the whole sequence; all_positions asks prompt_logprobs
    out = backend.forward(ModelInput([SeqChunk(1, [6, 9, 10], 3, [], all_positions=True)]))
    assert script.bodies[-1]["prompt"] == [3, 4, 5, 6, 9, 10] and script.bodies[-1]["prompt_logprobs"] == 3
    assert script.bodies[-1]["max_tokens"] == 1 and script.bodies[-1]["return_tokens_as_token_ids"]
    assert out.all_logits[1].argmax(-1).tolist() == [7, 10, 11]  # after 6, after 9, after 10
    # a rollback (speculative rejection) resends the kept prefix
    backend.forward(ModelInput([SeqChunk(1, [2], 4, [])]))
    assert script.bodies[-1]["prompt"] == [3, 4, 5, 6, 2]
    backend.release(1)
    with pytest.raises(ValueError, match="never sent"):
        backend.forward(ModelInput([SeqChunk(1, [2], 4, [])]))
    backend.close()


def test_backend_error_names_the_failed_sequences_only():
    def answer(body):
        return httpx.Response(400, json={"error": {"message": "too long"}}) if len(body["prompt"]) > 3 else \
            completion(body)

    backend = backend_for(Script(answer))
    with pytest.raises(BackendError) as info:
        backend.forward(ModelInput([SeqChunk(1, [1, 2], 0, []), SeqChunk(2, [1, 2, 3, 4], 0, [])]))
    assert list(info.value.errors) == [2] and "too long" in info.value.errors[2]
    assert "endpoint" in info.value.errors[2]
    assert backend.tokens == {}  # nothing committed: the engine retries the others from where they were
    backend.close()


def test_answers_without_token_ids_are_refused_clearly():
    def by_text(body):
        return httpx.Response(200, json={"choices": [{"logprobs": {"top_logprobs": [{"a": -0.1}]}}]})

    backend = backend_for(Script(by_text))
    with pytest.raises(BackendError, match="return_tokens_as_token_ids"):
        backend.forward(ModelInput([SeqChunk(1, [1], 0, [])]))
    backend.close()


def test_config_is_validated_with_the_offending_values():
    with pytest.raises(ValueError, match="http:// or https://.*'vllm:8000'"):
        RemoteConfig(url="vllm:8000")
    with pytest.raises(ValueError, match="logprobs must be in \\[1, 20\\], got 21"):
        RemoteConfig(url="http://x", logprobs=21)
    assert RemoteConfig(url="http://x:8000/v1/").base_url == "http://x:8000"
