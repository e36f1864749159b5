"""/metrics (Prometheus) against what the requests themselves report: each test makes its own requests and
compares before/after differences, so it passes alone and in any order."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest

from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from tests.serve.conftest import PROMPT, delta

ROUTING = "entropy:0.3"  # both models write tokens


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_metrics_exposition(client, server):
    server.wait_idle()
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0)
    m = server.wait_idle()
    assert m['collab_decode_kv_blocks_total{pool="small"}'] > 0 and m['collab_decode_kv_blocks_total{pool="large"}'] > 0
    for name in ("time_to_first_token_seconds", "request_latency_seconds", "engine_step_seconds"):
        assert m[f"collab_decode_{name}_count"] >= 1, name
    assert 0 <= m["collab_decode_large_share"] <= 1


def test_token_counts_equal_usage(client, server):
    """Tokens by model, prompt tokens, finished requests and their large shares, as /metrics counts them,
    equal the sums over the `usage` of the requests made meanwhile (REST and gRPC, streamed and not)."""
    before = server.wait_idle()
    usages = []
    for max_tokens in (8, 24):
        usages.append(client.completions.create(model="demo", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                extra_body={"routing": ROUTING}).usage.model_dump())
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}], max_tokens=20,
                                          temperature=0, stream=True, stream_options={"include_usage": True},
                                          extra_body={"routing": ROUTING})
    usages.append([c for c in chat][-1].usage.model_dump())
    with grpc.insecure_channel(server.grpc_target) as channel:
        got = pb_grpc.CollabDecodeStub(channel).Generate(pb.GenerateRequest(
            text=PROMPT, sampling=pb.SamplingParams(max_tokens=12, temperature=0), routing=ROUTING), timeout=60)
        u = got.usage
        usages.append({"prompt_tokens": u.prompt_tokens, "small_tokens": u.small_tokens,
                       "large_tokens": u.large_tokens, "large_share": u.large_share, "large_calls": u.large_calls})
    after = server.wait_idle()
    total = {key: sum(u[key] for u in usages) for key in ("prompt_tokens", "small_tokens", "large_tokens",
                                                         "large_calls")}
    assert total["small_tokens"] > 0 and total["large_tokens"] > 0
    for model in ("small", "large"):
        assert delta(before, after, f'collab_decode_generation_tokens_total{{model="{model}"}}') == \
            total[f"{model}_tokens"], model
    assert delta(before, after, "collab_decode_prompt_tokens_total") == total["prompt_tokens"]
    assert delta(before, after, "collab_decode_large_calls_total") == total["large_calls"] > 0
    # the engine's own forwards: one per step that ran the model (a call several requests share counts once)
    assert 0 < delta(before, after, 'collab_decode_model_forwards_total{model="large"}') <= total["large_calls"]
    assert delta(before, after, 'collab_decode_model_forwards_total{model="small"}') >= total["small_tokens"] // 4
    assert delta(before, after, "collab_decode_large_waits_total") == 0  # this server lets no token wait
    finished = sum(delta(before, after, f'collab_decode_requests_total{{outcome="{o}"}}') for o in ("stop", "length"))
    assert finished == len(usages)
    assert delta(before, after, "collab_decode_request_large_share_count") == len(usages)
    assert delta(before, after, "collab_decode_request_large_share_sum") == \
        pytest.approx(sum(u["large_share"] for u in usages), abs=1e-5)


def test_prefix_cache_hits_equal_usage(client, server):
    """A prompt sent again finds its blocks in the prefix cache: usage.prompt_tokens_details.cached_tokens (REST,
    as the openai client reads it) and usage.cached_tokens (gRPC) say how many tokens, and /metrics counts the
    same lookups and hits."""
    prompt = f"{PROMPT} Then she gives away 7. How many does she have left?"
    before = server.wait_idle()
    first = client.completions.create(model="demo", prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"routing": "small"}).usage
    chat = [client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=4, temperature=0, extra_body={"routing": "small"}).usage
            for _ in range(2)]
    with grpc.insecure_channel(server.grpc_target) as channel:
        got = pb_grpc.CollabDecodeStub(channel).Generate(pb.GenerateRequest(
            text=prompt, sampling=pb.SamplingParams(max_tokens=4, temperature=0), routing="small"), timeout=60)
    after = server.wait_idle()
    cached = [u.prompt_tokens_details.cached_tokens for u in [first] + chat] + [got.usage.cached_tokens]
    # the second chat request and the gRPC one find every whole block of their prompts but the last token's
    block = server.engine.config.block_size
    assert cached[2] == (chat[1].prompt_tokens - 1) // block * block > 0
    assert cached[3] == (got.usage.prompt_tokens - 1) // block * block > 0
    assert delta(before, after, 'collab_decode_prefix_cache_hits_total{pool="small"}') == sum(cached)
    assert delta(before, after, 'collab_decode_prefix_cache_queries_total{pool="small"}') == \
        first.prompt_tokens + sum(u.prompt_tokens for u in chat) + got.usage.prompt_tokens


def test_time_per_output_token_and_queue_time(client, server):
    """One TPOT per finished request of two or more tokens, one queue time per finished request: a request's time
    per token after its first fits in its latency (n - 1 times), and its time queued in the engine in its TTFT."""
    before = server.wait_idle()
    for max_tokens in (12, 1):
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                  extra_body={"routing": ROUTING, "ignore_eos": True})
    after = server.wait_idle()
    assert delta(before, after, "collab_decode_time_per_output_token_seconds_count") == 1  # not the 1-token one
    assert delta(before, after, "collab_decode_request_queue_time_seconds_count") == 2
    tpot = delta(before, after, "collab_decode_time_per_output_token_seconds_sum")
    assert 0 < 11 * tpot < delta(before, after, "collab_decode_request_latency_seconds_sum")
    queued = delta(before, after, "collab_decode_request_queue_time_seconds_sum")
    assert 0 <= queued < delta(before, after, "collab_decode_time_to_first_token_seconds_sum")
