"""The remote backend against a second collab-decode server serving the demo large model (the default suite's
stand-in for vLLM; tests/backends/test_remote_vllm.py runs the same checks against a real vLLM server).

Greedy `large`, `entropy` and `speculative:4` through the endpoint equal the all-local pair; our server
answers the vLLM extensions the backend relies on (token-id prompts, logprobs named by token id,
prompt_logprobs); stopping the endpoint mid-request fails that request with a clear error while the
server keeps serving and reports the large model unavailable, and routing resumes once it is back.
"""

from __future__ import annotations

import contextlib
import threading

import httpx
import pytest

from collab_decode.demo.task import is_correct
from collab_decode.sampling import SamplingParams
from collab_decode.serve.requests import ServedModel
from collab_decode.serve.server import ServeConfig
from tests.backends.conftest import (ENDPOINT_MODEL, GREEDY, assert_greedy_matches, demo_prompts, large_endpoint,
                                     remote_pair)
from tests.serve.conftest import install_gate, running_server, wait_until

NUM_PROBLEMS = 4  # the default suite's share; test_remote_vllm.py runs 20 against vLLM and against collab-decode
# our server has no prefix cache: each call re-prefills the whole sequence, so the all-large checks stay short here
SHORT = SamplingParams(max_tokens=100, temperature=0.0)


@pytest.fixture(scope="module")
def endpoint():
    with large_endpoint() as server:
        yield server


@pytest.fixture(scope="module")
def remote_engine(endpoint):
    engine = remote_pair(endpoint.url)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(local_engine):
    return demo_prompts(local_engine.tokenizer, NUM_PROBLEMS)


@pytest.fixture(scope="module")
def local_large(local_engine, prompts):
    return local_engine.generate(prompts[1][:2], SHORT, "large")


def test_greedy_large_through_endpoint_equals_local(local_engine, remote_engine, prompts, local_large):
    remote = remote_engine.generate(prompts[1][:2], SHORT, "large")
    for prompt_ids, local, result in zip(prompts[1], local_large, remote):
        assert result.error is None and result.stats["large_share"] == 1.0
        assert_greedy_matches(local_engine, prompt_ids, local.token_ids, result.token_ids)
    assert all(not kv.num_used_blocks for kv in remote_engine.kv.values())
    assert not remote_engine.backends["large"].tokens  # released with their sequences


def test_entropy_routing_through_endpoint_equals_local(local_engine, remote_engine, prompts):
    problems, prompt_ids = prompts
    local = local_engine.generate(prompt_ids, GREEDY, "entropy:0.6")
    remote = remote_engine.generate(prompt_ids, GREEDY, "entropy:0.6")
    assert [r.token_ids for r in remote] == [r.token_ids for r in local]
    assert [r.provenance for r in remote] == [r.provenance for r in local]
    assert 0 < sum(r.stats["large_tokens"] for r in remote) < sum(len(r.token_ids) for r in remote)
    assert sum(is_correct(r.text, p.answer) for r, p in zip(remote, problems)) == \
        sum(is_correct(r.text, p.answer) for r, p in zip(local, problems))


def test_speculative_through_endpoint_equals_large(remote_engine, prompts, local_large):
    remote = remote_engine.generate(prompts[1][:2], SHORT, "speculative:4")
    assert [r.token_ids for r in remote] == [r.token_ids for r in local_large[:2]]
    assert all(0 < r.stats["large_tokens"] < len(r.token_ids) for r in remote)  # drafts were kept


def test_sampling_with_top_k_within_the_endpoints_logprobs_equals_local(local_engine, remote_engine, prompts):
    """Client-side sampling from the endpoint's top 20: with top_k <= 20 the distribution is the local one,
    so the request's own seed draws the same tokens."""
    sampling = SamplingParams(max_tokens=24, temperature=0.8, top_k=10, seed=7)
    local = local_engine.generate(prompts[1][:1], sampling, "large")[0]
    remote = remote_engine.generate(prompts[1][:1], sampling, "large")[0]
    assert remote.error is None and remote.token_ids == local.token_ids


def test_endpoint_answers_token_id_logprobs_and_prompt_logprobs(endpoint, local_engine, prompts):
    """What the backend reads from a collab-decode endpoint, in vLLM's format, against the local large model."""
    prompt_ids = prompts[1][0]
    body = {"model": ENDPOINT_MODEL, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 5,
            "prompt_logprobs": 3, "return_tokens_as_token_ids": True}
    choice = httpx.post(f"{endpoint.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    top = choice["logprobs"]["top_logprobs"][0]
    assert len(top) == 5 and all(key.startswith("token_id:") for key in top)
    assert choice["logprobs"]["tokens"][0] == max(top, key=top.get)
    prompt_lp = choice["prompt_logprobs"]
    assert len(prompt_lp) == len(prompt_ids) and prompt_lp[0] is None
    for i in (1, len(prompt_ids) // 2, len(prompt_ids) - 1):  # the prompt token itself, then the top 3
        entry = prompt_lp[i]
        assert str(prompt_ids[i]) in entry and 3 <= len(entry) <= 4
        assert sorted(v["rank"] for k, v in entry.items() if k != str(prompt_ids[i]) or v["rank"] <= 3)[:3] == [1, 2, 3]
    # the last position's distribution equals the local large model's next-token logprobs
    seq_id = local_engine.add_request(prompt_ids, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), "large")
    seq = local_engine.seqs[seq_id]
    while not seq.finished:
        local_engine.step()
    local_top = {f"token_id:{t}": lp for t, lp in seq.top_logprobs[0]}
    assert top.keys() == local_top.keys()
    assert all(abs(top[k] - local_top[k]) < 1e-4 for k in top)


def _stream(url: str, body: dict, events: list, started: threading.Event) -> None:
    """Read a streamed completion into `events` (each parsed chunk, or the error object)."""
    import json

    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                started.set()


def _text_of(events: list) -> str:
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


def test_endpoint_down_mid_request_fails_it_and_routing_resumes(prompts, local_large, monkeypatch):
    prompt_ids = prompts[1][0]
    with contextlib.ExitStack() as stack:
        endpoint_stack = stack.enter_context(contextlib.ExitStack())
        endpoint = endpoint_stack.enter_context(large_endpoint())
        engine = remote_pair(endpoint.url, failure_threshold=1, probe_interval_s=0.2, max_retries=1)
        stack.callback(engine.close)
        model = ServedModel(name="demo", small_dir="small", large_dir=endpoint.url)
        server = stack.enter_context(running_server(ServeConfig(port=0, grpc_port=0, log_level="warning"), engine,
                                                    model))
        gate = install_gate(server, monkeypatch)
        # a `large` request streams until it has written 5 tokens; the engine pauses there
        gate.pause(when=lambda e: any(s.num_output_tokens >= 5 for s in e.seqs.values()))
        events, started = [], threading.Event()
        body = {"prompt": prompt_ids, "max_tokens": 300, "temperature": 0.0, "routing": "large",
                "return_provenance": True}
        reader = threading.Thread(target=_stream, args=(server.url, body, events, started), daemon=True)
        reader.start()
        gate.wait_paused()
        endpoint_stack.close()  # the endpoint goes away mid-request
        gate.resume()  # the request's next large call fails: it ends with a clear error, the server stays up
        reader.join(timeout=60)
        assert started.is_set() and "error" in events[-1], events[-1:]
        message = events[-1]["error"]["message"]
        assert "large model" in message and "endpoint" in message and endpoint.url in message, message
        assert 5 <= len([t for e in events[:-1] for t in e["choices"][0]["token_ids"]]) < 300
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "degraded" and endpoint.url in health["unavailable"]["large"], health
        assert server.metrics()['collab_decode_model_available{model="large"}'] == 0
        # requests that do not need the large model are served; those that do fail at once (503)
        small = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 20, "routing": "small"},
                           timeout=60)
        assert small.status_code == 200 and small.json()["usage"]["large_tokens"] == 0
        large = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 20}, timeout=60)
        assert large.status_code == 503 and "unavailable" in large.json()["error"]["message"]
        assert large.json()["error"]["code"] == "upstream_error"  # a model that could not run it: may pass later
        # the endpoint comes back on the same port: health recovers and routing resumes
        with large_endpoint(endpoint.server.port):
            wait_until(lambda: httpx.get(f"{server.url}/health").json()["status"] == "ok", "health recovers", 30)
            again = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 40}, timeout=120)
            assert again.status_code == 200, again.text
            assert again.json()["choices"][0]["token_ids"] == local_large[0].token_ids[:40]
            assert server.metrics()['collab_decode_model_available{model="large"}'] == 1
        server.wait_idle()
