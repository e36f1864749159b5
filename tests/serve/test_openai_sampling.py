"""What a request asks of sampling reaches the engine, through the official openai client: logprobs (values,
not just shapes, streamed and not) equal a reference engine's; seeded sampling at temperature 1 equals the
reference engine's draw for that seed; stop strings, stop token ids, and text held back for a stop string
that never comes, streamed and not."""

from __future__ import annotations

import openai
import pytest

from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.sampling import SamplingParams
from tests.serve.conftest import DEFAULT_POLICY, PROMPT, chat_ids, reference_run

MAX_TOKENS = 16
ROUTING = "entropy:0.3"  # both models write tokens: the logprobs of each are checked
TOP = 3


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def expected_completion_logprobs(tokenizer, seq) -> dict:
    tokens = [tokenizer.decode([t]) for t in seq.output_ids]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    top = [{tokenizer.decode([t]): lp for t, lp in alternatives} for alternatives in seq.top_logprobs]
    return {"tokens": tokens, "token_logprobs": seq.logprobs, "top_logprobs": top, "text_offset": offsets}


def assert_logprobs_close(got: dict, want: dict) -> None:
    assert got["tokens"] == want["tokens"]
    assert got["text_offset"] == want["text_offset"]
    assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-4)
    assert len(got["top_logprobs"]) == len(want["top_logprobs"])
    for got_top, want_top in zip(got["top_logprobs"], want["top_logprobs"]):
        assert got_top == pytest.approx(want_top, abs=1e-4)


def test_completion_logprobs_equal_engine_streamed_and_not(client, reference_engine):
    want = reference_run(reference_engine, PROMPT, greedy(logprobs=TOP), ROUTING)
    assert {"small", "large"} <= set(want.provenance) and all(len(top) == TOP for top in want.top_logprobs)
    expected = expected_completion_logprobs(reference_engine.tokenizer, want)
    kwargs = dict(model="demo", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP,
                  extra_body={"routing": ROUTING})
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.text == want.output_text == "".join(expected["tokens"])
    assert_logprobs_close(whole.logprobs.model_dump(), expected)
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True)]
    streamed = {key: [v for c in chunks for v in getattr(c.logprobs, key)]
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert_logprobs_close(streamed, expected)
    assert "".join(c.text for c in chunks) == whole.text


def chat_logprobs(content) -> list[tuple]:
    return [(c.token, c.logprob, c.bytes, [(t.token, t.logprob) for t in c.top_logprobs]) for c in content]


def test_chat_logprobs_equal_engine_streamed_and_not(client, reference_engine):
    tok = reference_engine.tokenizer
    want = reference_run(reference_engine, chat_ids(tok, PROMPT), greedy(logprobs=TOP), ROUTING)
    assert {"small", "large"} <= set(want.provenance)
    kwargs = dict(model="demo", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
                  temperature=0, logprobs=True, top_logprobs=TOP, extra_body={"routing": ROUTING})
    whole = client.chat.completions.create(**kwargs).choices[0]
    got = chat_logprobs(whole.logprobs.content)
    assert whole.message.content == want.output_text
    assert [g[0] for g in got] == [tok.decode([t]) for t in want.output_ids]
    assert [g[1] for g in got] == pytest.approx(want.logprobs, abs=1e-4)
    assert [g[2] for g in got] == [list(g[0].encode()) for g in got]
    for (_, _, _, got_top), want_top in zip(got, want.top_logprobs):
        assert [t for t, _ in got_top] == [tok.decode([t]) for t, _ in want_top]
        assert [lp for _, lp in got_top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert chunks[0].choices[0].logprobs is None  # the opening chunk (role only) carries no token
    streamed = [entry for c in chunks[1:] for entry in chat_logprobs(c.choices[0].logprobs.content)]
    assert streamed == got
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content


def test_seeded_sampling_equals_engine(client, reference_engine):
    def sample(top_k: int | None = None, **params):
        choice = client.completions.create(model="demo", prompt=PROMPT, max_tokens=MAX_TOKENS, **params,
                                           extra_body={"return_provenance": True, "top_k": top_k}).choices[0]
        return choice.model_extra["token_ids"], choice.text

    greedy_ids, _ = sample(temperature=0)
    drawn = {}
    for seed in (0, 1, 2):
        want = reference_run(reference_engine, PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0,
                                                                      seed=seed), DEFAULT_POLICY)
        assert sample(temperature=1.0, seed=seed) == (want.output_ids, want.output_text), seed
        drawn[seed] = tuple(want.output_ids)
    assert len(set(drawn.values())) == len(drawn)  # each seed draws its own output
    assert all(list(ids) != greedy_ids for ids in drawn.values())  # temperature 1 is not greedy
    want = reference_run(reference_engine, PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9,
                                                                  top_p=0.95, top_k=20, seed=7), DEFAULT_POLICY)
    assert sample(temperature=0.9, top_p=0.95, top_k=20, seed=7) == (want.output_ids, want.output_text)


def test_seeded_chat_equals_engine(client, reference_engine):
    want = reference_run(reference_engine, chat_ids(reference_engine.tokenizer, PROMPT),
                         SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3), DEFAULT_POLICY)
    got = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}],
                                         max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
                                         extra_body={"return_provenance": True}).choices[0]
    assert got.model_extra["token_ids"] == want.output_ids and got.message.content == want.output_text


def streamed_completion(client, extra: dict | None = None, **kwargs) -> tuple[str, list[int], list[str | None]]:
    """Text, token ids and finish reason per chunk of a streamed completion."""
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True,
                                                               extra_body={"return_provenance": True, **(extra or {})})]
    return ("".join(c.text for c in chunks), [t for c in chunks for t in c.model_extra["token_ids"]],
            [c.finish_reason for c in chunks])


def test_stop_string_while_streaming(client):
    base = dict(model="demo", prompt=chat_prompt(PROMPT), max_tokens=32, temperature=0)  # a worked solution
    text = client.completions.create(**base).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text[:text.index(stop)]
    assert cut, text
    whole = client.completions.create(**base, stop=[stop]).choices[0]
    assert (whole.text, whole.finish_reason) == (cut, "stop")
    streamed, _, finishes = streamed_completion(client, stop=[stop], **base)
    assert streamed == cut
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=32, temperature=0, stop=stop, stream=True)
    chat_chunks = [c.choices[0] for c in chat]
    assert "".join(c.delta.content or "" for c in chat_chunks) == cut
    assert chat_chunks[-1].finish_reason == "stop"


def test_stop_string_that_never_comes_holds_back_no_text_at_the_end(client, reference_engine):
    """While a stop string may still begin, the server holds text back; at the end it must send it all."""
    base = dict(model="demo", prompt=chat_prompt(PROMPT), max_tokens=32, temperature=0, stop=["@" * 12])
    text, ids, finishes = streamed_completion(client, **base)
    assert finishes[-1] == "length" and len(ids) == 32
    assert text == reference_engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert text == client.completions.create(**{**base, "stop": None}).choices[0].text
    whole = client.completions.create(**base).choices[0]
    assert whole.text == text and whole.finish_reason == "length"


def test_stop_token_ids(client, reference_engine):
    base = dict(model="demo", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    ids = client.completions.create(**base, extra_body={"return_provenance": True}).choices[0].model_extra["token_ids"]
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # the first occurrence of a token
    want = reference_run(reference_engine, PROMPT, greedy(stop_token_ids=(ids[k],)), DEFAULT_POLICY)
    assert want.output_ids == ids[:k + 1]
    got = client.completions.create(**base, extra_body={"return_provenance": True, "stop_token_ids": [ids[k]]})
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == ids[:k + 1] and choice.finish_reason == "stop"
    assert choice.text == want.output_text and got.usage.completion_tokens == k + 1
    text, streamed_ids, finishes = streamed_completion(client, {"stop_token_ids": [ids[k]]}, **base)
    assert (text, streamed_ids, finishes[-1]) == (want.output_text, ids[:k + 1], "stop")
