"""The completions contract evaluation clients use (lm-evaluation-harness's `local-completions`): `echo` with
`logprobs` scores the prompt (the large model's log_softmax at each position, equal to transformers; the small
model's under `small` routing), in OpenAI's/vLLM's shape; `max_tokens` 0 with echo; a list of prompts per
request answers as separate requests would; `n` choices per prompt (seeded: distinct and reproducible; greedy:
identical), streamed and not; every KV block is free afterwards."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from collab_decode.demo import checkpoint_dir
from collab_decode.demo.tokenizer import chat_prompt
from collab_decode.sampling import SamplingParams
from tests.serve.conftest import DEFAULT_POLICY, PROMPT, chat_ids, reference_run

PROMPTS = [chat_prompt(q) for q in (
    PROMPT, "Ben has 640 coins. (a) He loses 215. (b) Then he buys 48 more. How many coins does Ben have now?",
    "Cara has 123 beads. (a) She gets 456 more. How many beads does Cara have now?")]
TOP = 2


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def prompt_ids(reference_engine) -> list[int]:
    return reference_engine.tokenizer(PROMPT, add_special_tokens=True)["input_ids"]


def transformers_logprobs(which: str, ids: list[int]) -> torch.Tensor:
    """(T - 1, V): log_softmax of the model's logits at prompt positions 0..T-2 (predicting tokens 1..T-1)."""
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir(which))).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def post(server, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("routing, scorer", [(None, "large"), ("entropy:0.3", "large"), ("small", "small")])
def test_echo_logprobs_score_the_prompt_like_transformers(server, prompt_ids, routing, scorer):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs, max_tokens 0 or 1, token-id prompts)."""
    body = {"prompt": prompt_ids, "max_tokens": 0, "echo": True, "logprobs": TOP, "temperature": 0}
    answer = post(server, body if routing is None else {**body, "routing": routing})
    choice, usage = answer["choices"][0], answer["usage"]
    tokenizer = server.engine.tokenizer
    assert choice["text"] == tokenizer.decode(prompt_ids) and choice["finish_reason"] == "length"
    assert usage["prompt_tokens"] == len(prompt_ids) and usage["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in prompt_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    pieces = lp["tokens"]
    assert lp["text_offset"] == [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    want = transformers_logprobs(scorer, prompt_ids)
    targets = torch.tensor(prompt_ids[1:])
    expected = want.gather(-1, targets[:, None])[:, 0].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    for i, top in enumerate(lp["top_logprobs"][1:]):
        best_lp, best_ids = want[i].topk(TOP)
        want_top = {tokenizer.decode([t]): x for t, x in zip(best_ids.tolist(), best_lp.tolist())}
        want_top[tokenizer.decode([prompt_ids[i + 1]])] = expected[i]  # the token itself is always there (vLLM)
        assert top == pytest.approx(want_top, abs=1e-4)
    server.wait_idle()


def test_echo_with_generation_puts_the_prompt_first(server, reference_engine, prompt_ids):
    """max_tokens 1 (what lm-evaluation-harness 0.4 sends): the prompt's tokens, then the generated one."""
    scored = post(server, {"prompt": prompt_ids, "max_tokens": 0, "echo": True, "logprobs": 1})["choices"][0]
    answer = post(server, {"prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
    choice = answer["choices"][0]
    want = reference_run(reference_engine, PROMPT, SamplingParams(max_tokens=1, temperature=0.0, logprobs=1))
    assert choice["text"] == PROMPT + want.output_text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt_ids) + 1 and lp["tokens"][-1] == want.output_text
    assert lp["token_logprobs"][:-1] == pytest.approx(scored["logprobs"]["token_logprobs"], abs=1e-5)
    assert lp["token_logprobs"][-1] == pytest.approx(want.logprobs[0], abs=1e-4)
    assert lp["text_offset"][-1] == len(PROMPT)
    assert answer["usage"]["completion_tokens"] == 1
    plain = post(server, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})["choices"][0]
    echoed = post(server, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True})["choices"][0]
    assert echoed["text"] == PROMPT + plain["text"] and echoed["logprobs"] is None


def test_echo_streamed_starts_each_choice_with_its_prompt(client):
    chunks = list(client.completions.create(model="demo", prompt=PROMPTS[:2], max_tokens=3, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    whole = client.completions.create(model="demo", prompt=PROMPTS[:2], max_tokens=3, temperature=0, echo=True,
                                      logprobs=1)
    for index, prompt in enumerate(PROMPTS[:2]):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].text.startswith(prompt)
        assert "".join(c.text for c in mine) == whole.choices[index].text
        streamed = [x for c in mine for x in c.logprobs.token_logprobs]
        assert streamed[0] is None
        assert streamed[1:] == pytest.approx(whole.choices[index].logprobs.token_logprobs[1:], abs=1e-5)
        offsets = [x for c in mine for x in c.logprobs.text_offset]
        assert offsets == whole.choices[index].logprobs.text_offset
    scored = list(client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1,
                                            stream=True))
    assert "".join(c.choices[0].text for c in scored if c.choices) == PROMPTS[0]
    assert scored[-1].choices[0].finish_reason == "length" and scored[-1].usage.completion_tokens == 0


def test_a_list_of_prompts_answers_as_separate_requests(client, server):
    kwargs = dict(model="demo", max_tokens=12, temperature=0, logprobs=1)
    batch = client.completions.create(prompt=PROMPTS, **kwargs)
    alone = [client.completions.create(prompt=p, **kwargs) for p in PROMPTS]
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    for got, want in zip(batch.choices, alone):
        assert got.logprobs.token_logprobs == pytest.approx(want.choices[0].logprobs.token_logprobs, abs=1e-4)
    usage = batch.usage.model_dump()
    assert usage["prompt_tokens"] == sum(a.usage.prompt_tokens for a in alone)
    assert usage["completion_tokens"] == sum(a.usage.completion_tokens for a in alone)
    small, large = (sum(a.usage.model_extra[k] for a in alone) for k in ("small_tokens", "large_tokens"))
    assert (usage["small_tokens"], usage["large_tokens"]) == (small, large)
    assert usage["large_share"] == pytest.approx(large / (small + large))
    ids = [server.engine.tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    as_ids = client.completions.create(prompt=ids, **kwargs)
    assert [c.text for c in as_ids.choices] == [c.text for c in batch.choices]
    server.wait_idle()


def test_n_seeded_choices_differ_and_reproduce(client, server, reference_engine):
    kwargs = dict(model="demo", prompt=PROMPTS[:2], max_tokens=10, temperature=3.0, seed=7, n=3,
                  extra_body={"routing": DEFAULT_POLICY, "return_provenance": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == list(range(6))  # prompt_index * n + i
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts[:3])) > 1 and len(set(texts[3:])) > 1
    for i in range(3):  # choice i samples with seed + i
        want = reference_run(reference_engine, PROMPTS[1], SamplingParams(max_tokens=10, temperature=3.0, seed=7 + i),
                             DEFAULT_POLICY)
        assert texts[3 + i] == want.output_text
    assert first.usage.prompt_tokens == sum(len(reference_engine.tokenizer(p)["input_ids"]) for p in PROMPTS[:2])
    assert first.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in first.choices)
    greedy = client.completions.create(model="demo", prompt=PROMPT, max_tokens=10, temperature=0, n=3)
    assert len({c.text for c in greedy.choices}) == 1 and len(greedy.choices) == 3
    server.wait_idle()


def test_n_streamed_and_chat(client, server):
    kwargs = dict(model="demo", prompt=PROMPTS[:2], max_tokens=8, temperature=3.0, seed=3, n=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for choice in whole.choices:
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == choice.index) \
            == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert sorted(c.choices[0].index for c in finishing) == [0, 1, 2, 3]
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=3.0, seed=3, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.prompt_tokens == len(chat_ids(
        server.engine.tokenizer, PROMPT))  # counted once: both choices share the prompt
    assert chat.choices[0].message.content != chat.choices[1].message.content
    streamed = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=3.0,
                                                   seed=3, n=2, stream=True))
    for choice in chat.choices:
        assert "".join(c.choices[0].delta.content or "" for c in streamed
                       if c.choices and c.choices[0].index == choice.index) == choice.message.content
    server.wait_idle()


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),  # generating nothing needs echo
    ({"prompt": [PROMPT] * 40, "n": 2}, "n"),  # more choices than the server holds at once (max_queue 64)
    ({"prompt": [[5, 6, 7], [1, 10**6]]}, "*"),  # one bad prompt refuses the request; the others are aborted
    ({"prompt": PROMPT, "seed": 2**64 - 2, "n": 3}, "seed"),
    ({"prompt": PROMPT, "best_of": 3}, "best_of"),
])
def test_bad_batches_are_refused_whole(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert param == "*" or r.json()["error"]["param"] == param
    server.wait_idle()


# ---- gRPC: the same choices and prompt scoring -------------------------------------------------------
@pytest.fixture(scope="module")
def stub(server):
    import grpc

    from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.CollabDecodeStub(channel)


def test_grpc_prompt_logprobs_and_n_streamed(stub, server, prompt_ids, reference_engine):
    import grpc

    from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb

    scored = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling=pb.SamplingParams(
        max_tokens=1, temperature=0, prompt_logprobs=TOP)), timeout=60)
    assert len(scored.prompt_logprobs) == len(prompt_ids) and not scored.prompt_logprobs[0].HasField("logprob")
    want = transformers_logprobs("large", prompt_ids).gather(-1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]
    assert [p.logprob for p in scored.prompt_logprobs[1:]] == pytest.approx(want.tolist(), abs=1e-4)
    assert all(len(p.top.token_ids) == TOP for p in scored.prompt_logprobs[1:])
    sampling = pb.SamplingParams(max_tokens=10, temperature=3.0, seed=11)
    messages = list(stub.GenerateStream(pb.GenerateRequest(text=PROMPTS[0], sampling=sampling, n=3), timeout=60))
    texts = ["".join(m.text for m in messages if m.index == i) for i in range(3)]
    assert len(set(texts)) > 1 and messages[-1].usage.completion_tokens == sum(len(m.token_ids) for m in messages)
    for i in range(3):
        want = reference_run(reference_engine, PROMPTS[0], SamplingParams(max_tokens=10, temperature=3.0, seed=11 + i))
        assert texts[i] == want.output_text
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sampling, n=2), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    server.wait_idle()
