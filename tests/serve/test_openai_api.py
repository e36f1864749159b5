"""The official openai client against the real server: completions and chat, streaming and not; greedy
output equals the engine's for the same request; the routing extension, usage and provenance.
(Logprobs, seeded sampling and stops: test_openai_sampling.py; /metrics: test_metrics.py.)"""

from __future__ import annotations

import httpx
import openai
import pytest

from collab_decode.sampling import SamplingParams
from tests.serve.conftest import DEFAULT_POLICY, PROMPT, chat_ids

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected(engine, prompt: str, policy: str = DEFAULT_POLICY, chat: bool = False, **sampling):
    """What the engine answers to this request alone (chat: the chat template as Hugging Face tokenizes it)."""
    if chat:
        prompt = chat_ids(engine.tokenizer, prompt)
    params = SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0.0, **sampling})
    return engine.generate([prompt], params, policy)[0]


def test_completion_greedy_equals_engine(client, reference_engine):
    want = expected(reference_engine, PROMPT)
    got = client.completions.create(model="demo", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    choice = got.choices[0]
    assert choice.text == want.text
    assert choice.finish_reason == want.finish_reason
    usage = got.usage.model_dump()
    assert usage["completion_tokens"] == len(want.token_ids)
    assert usage["prompt_tokens"] == len(want.prompt_token_ids)
    assert usage["small_tokens"] == want.stats["small_tokens"]
    assert usage["large_tokens"] == want.stats["large_tokens"]
    assert usage["large_share"] == pytest.approx(want.stats["large_share"])


def test_completion_stream_equals_engine(client, reference_engine):
    want = expected(reference_engine, PROMPT, "large")
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, extra_body={"routing": {"policy": "large"}}))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.model_extra["large_share"] == 1.0


def test_chat_greedy_equals_engine_with_chat_template(client, reference_engine):
    want = expected(reference_engine, PROMPT, chat=True)
    got = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}],
                                         max_tokens=MAX_TOKENS, temperature=0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)


def test_chat_stream_equals_engine(client, reference_engine):
    want = expected(reference_engine, PROMPT, "small", chat=True)
    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"routing": "small"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.model_extra["large_tokens"] == 0


def test_stream_ends_with_done(server):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_routing_extension_and_provenance(client, reference_engine):
    routing = {"policy": "entropy", "threshold": 0.3}
    want = expected(reference_engine, PROMPT, "entropy:0.3")
    got = client.completions.create(model="demo", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"routing": routing, "return_provenance": True})
    extra = got.choices[0].model_extra
    assert extra["token_ids"] == want.token_ids
    assert extra["provenance"] == want.provenance
    assert got.usage.model_extra["large_tokens"] == want.provenance.count("large") > 0


def test_speculative_routing_object_takes_k(client, reference_engine):
    want = expected(reference_engine, PROMPT, "large")  # speculative greedy == the large model alone
    got = client.completions.create(model="demo", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"routing": {"policy": "speculative", "k": 3}})
    assert got.choices[0].text == want.text


def test_models_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["demo"]
    card = client.models.retrieve("demo").model_extra
    assert card["max_model_len"] == 512 and card["default_policy"] == DEFAULT_POLICY
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
