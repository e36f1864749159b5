"""Each bad input gets its OpenAI-style error (and the server keeps serving: a good request right after
succeeds); the API key (401) and the queue bound (429)."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, PROMPT, wait_until

GOOD = {"model": "demo", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
LONG_PROMPT = "one two " * 400  # ~800 tokens against a 512-token context

BAD_COMPLETIONS = {
    "malformed JSON": (b'{"prompt": "x", "max_tokens": ', None),
    "body not an object": ([1, 2], None),
    "max_tokens wrong type": ({**GOOD, "max_tokens": "5"}, "max_tokens"),
    "temperature wrong type": ({**GOOD, "temperature": "hot"}, "temperature"),
    "prompt wrong type": ({**GOOD, "prompt": 42}, "prompt"),
    "max_tokens zero": ({**GOOD, "max_tokens": 0}, "max_tokens"),
    "max_tokens negative": ({**GOOD, "max_tokens": -1}, "max_tokens"),
    "max_tokens huge": ({**GOOD, "max_tokens": 10**9}, None),
    "prompt too long": ({**GOOD, "prompt": LONG_PROMPT}, None),
    "empty prompt": ({**GOOD, "prompt": ""}, None),
    "empty token prompt": ({**GOOD, "prompt": []}, None),
    "token id out of range": ({**GOOD, "prompt": [1, 10**6]}, None),
    "unknown policy": ({**GOOD, "routing": {"policy": "oracle", "threshold": 0.5}}, None),
    "unknown policy string": ({**GOOD, "routing": "oracle:0.5"}, None),
    "threshold out of range": ({**GOOD, "routing": {"policy": "confidence", "threshold": 1.5}}, None),
    "negative entropy threshold": ({**GOOD, "routing": "entropy:-1"}, None),
    "speculative k out of range": ({**GOOD, "routing": {"policy": "speculative", "k": 99}}, None),
    "unknown routing field": ({**GOOD, "routing": {"policy": "entropy", "treshold": 0.5}}, "routing"),
    "neural router not served": ({**GOOD, "routing": "neural:/etc:0.5"}, "routing"),
    "unknown model": ({**GOOD, "model": "gpt-5"}, "model"),
    "n zero": ({**GOOD, "n": 0}, "n"),
    "top_p out of range": ({**GOOD, "top_p": 0}, "top_p"),
    "logprobs too many": ({**GOOD, "logprobs": 50}, "logprobs"),
    "seed out of range": ({**GOOD, "seed": 2**70}, "seed"),
    "stop wrong type": ({**GOOD, "stop": [1, 2]}, "stop"),
}


def post(server, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"},
                          timeout=60, **kwargs)
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("case", list(BAD_COMPLETIONS))
def test_bad_completion_request_then_good_one(server, case):
    body, param = BAD_COMPLETIONS[case]
    assert_openai_error(post(server, "/v1/completions", body), 400, param)
    good = post(server, "/v1/completions", GOOD)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "hi"}], [{"content": "no role"}],
                                      "not a list", [{"role": "user", "content": 5}]])
def test_bad_chat_request_then_good_one(server, messages):
    assert_openai_error(post(server, "/v1/chat/completions", {"model": "demo", "messages": messages}), 400)
    good = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_raises_bad_request(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=0)
    assert "max_tokens" in e.value.message


def test_unknown_fields_are_ignored_and_named_in_the_log(server, caplog):
    """A field the server does not know (a misspelt parameter) does not fail the request (vLLM's behaviour); the
    server's log names it, on completions, chat and a chat message alike."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with caplog.at_level(logging.WARNING, logger="collab_decode.serve.protocol"):
        out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, temperature=0,
                                        extra_body={"max_token": 5, "frobnicate": True, "fake\nINFO line": 1})
        chat = post(server, "/v1/chat/completions", {"max_tokens": 2, "temprature": 0, "messages": [
            {"role": "user", "content": PROMPT, "mood": "curious", "refusal": None}]})
    assert out.usage.completion_tokens == 2 and chat.status_code == 200
    warned = [r.getMessage() for r in caplog.records if r.name == "collab_decode.serve.protocol"]
    assert any("CompletionRequest" in m and "'max_token', 'frobnicate'" in m for m in warned), warned
    assert all("\n" not in m for m in warned) and any("'fake\\nINFO line'" in m for m in warned), warned
    assert any("ChatCompletionRequest" in m and "temprature" in m for m in warned), warned
    assert any("ChatMessage" in m and "mood" in m and "refusal" not in m for m in warned), warned  # null: unsaid
    caplog.clear()
    post(server, "/v1/completions", GOOD)
    assert not [r for r in caplog.records if r.name == "collab_decode.serve.protocol"]  # nothing to name


def test_unknown_route_is_an_openai_404(server):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)


def test_api_key_required(guarded_server):
    url = f"{guarded_server.url}/v1"
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        error = assert_openai_error(httpx.post(f"{url}/completions", json=GOOD, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    assert client.completions.create(**GOOD).usage.completion_tokens == 2
    assert httpx.get(f"{guarded_server.url}/health").status_code == 200  # probes need no key


def test_queue_bound_gives_429_then_recovers(guarded_server, guarded_gate):
    url, headers = f"{guarded_server.url}/v1/completions", {"Authorization": f"Bearer {API_KEY}"}
    long = {**GOOD, "max_tokens": 400, "ignore_eos": True, "stream": True}
    engine = guarded_server.engine
    guarded_gate.pause()  # admitted requests stay in flight: they cannot finish while the probes run
    with httpx.Client(timeout=60, headers=headers) as a, httpx.Client(timeout=60, headers=headers) as b:
        with a.stream("POST", url, json=long) as first, b.stream("POST", url, json=long) as second:
            assert first.status_code == second.status_code == 200  # both admitted: the bound (2) is reached
            error = assert_openai_error(httpx.post(url, json=GOOD, headers=headers), 429)
            assert "capacity" in error["message"] and error["code"] == "server_busy"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=f"{guarded_server.url}/v1", api_key=API_KEY, max_retries=0) \
                    .completions.create(**GOOD)
    # the two streams were dropped: the engine drops them too (still held: they did not finish instead)
    wait_until(lambda: not engine.seqs, "the dropped streams leave the engine")
    guarded_gate.resume()
    guarded_server.wait_idle()  # slots and blocks free
    assert httpx.post(url, json=GOOD, headers=headers).status_code == 200
