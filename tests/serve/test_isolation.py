"""A request that fails in the engine (here: a router that raises on it) fails alone. Its client gets a clear
error (REST: 500 with the engine's message and its kind, or in a stream an error event then [DONE]; gRPC:
INTERNAL) while
the requests decoding beside it in the same steps complete with 200 and the tokens they get alone; every block
is free after and /health stays ok. A numeric field the engine cannot represent (beyond int64, not a finite
float32) is a 400 naming the field (gRPC: INVALID_ARGUMENT); a temperature that underflows samples like greedy."""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
import os
import signal

import grpc
import httpx
import pytest

from collab_decode.sampling import SamplingParams
from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.engine_core import EngineProcess
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from collab_decode.serve.requests import ServedModel
from collab_decode.serve.server import ServeConfig
from tests.serve.conftest import PROMPT, demo_engine, install_gate, reference_run, running_server, wait_until
from tests.utils import DECIDE_FAILS, OBSERVE_FAILS, make_engine, make_poisoned_pair, register_flaky_policy

MAX_TOKENS = 12
GOOD = {"model": "demo", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}


def flaky_body(seed: int, stream: bool = False) -> dict:
    return {"model": "demo", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": seed,
            "ignore_eos": True, "routing": "flaky", "stream": stream, "return_provenance": True}


def greedy(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=seed, ignore_eos=True)


async def post(client: httpx.AsyncClient, body: dict) -> tuple[int, dict]:
    r = await client.post("/v1/completions", json=body)
    return r.status_code, r.json()


async def stream(client: httpx.AsyncClient, body: dict) -> tuple[int, list]:
    """Status and the stream's events: parsed JSON objects, and "[DONE]"."""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        events = [line.removeprefix("data: ") async for line in r.aiter_lines() if line.startswith("data: ")]
    return r.status_code, [e if e == "[DONE]" else json.loads(e) for e in events]


async def run_held(server, gate, calls: list) -> list:
    """Send `calls` (coroutines of post/stream) while the gate holds the engine; once all are in the engine
    (so they share every step), let it go and gather their answers."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.to_thread(wait_until, lambda: len(server.engine.seqs) == len(calls), "all are in the engine")
        gate.resume()
        return await asyncio.wait_for(asyncio.gather(*tasks), 300)
    finally:
        gate.resume()
        for task in tasks:
            task.cancel()


def test_a_failing_request_fails_alone(server, gate, reference_engine, monkeypatch):
    flaky = register_flaky_policy(monkeypatch)
    want = {seed: reference_run(reference_engine, PROMPT, greedy(seed), flaky) for seed in (1, 2)}
    assert all(0 < w.stats.num_large_tokens < MAX_TOKENS for w in want.values())  # both models write
    server.wait_idle()
    gate.pause()  # nothing decodes until all four requests are in the engine: they then share every step

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await run_held(server, gate, [
                post(client, flaky_body(1)), stream(client, flaky_body(2, stream=True)),
                post(client, flaky_body(DECIDE_FAILS)), stream(client, flaky_body(OBSERVE_FAILS, stream=True))])

    (status1, done1), (status2, events2), (status3, failed3), (status4, events4) = asyncio.run(main())
    assert status1 == 200, done1
    choice = done1["choices"][0]
    assert (choice["token_ids"], choice["provenance"]) == (want[1].output_ids, want[1].provenance)
    assert (choice["text"], choice["finish_reason"]) == (want[1].output_text, "length")
    assert status2 == 200 and events2[-1] == "[DONE]"
    chunks = [e for e in events2[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want[2].output_text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert status3 == 500 and failed3["error"]["code"] == "internal_error"  # the server's fault: retrying won't help
    assert failed3["error"]["message"].startswith("internal error while routing this request")
    assert "decide failed" not in failed3["error"]["message"]  # the traceback is the log's, not the client's
    assert status4 == 200 and events4[-1] == "[DONE]"  # a stream that already started ends with an error event
    (error,) = [e["error"] for e in events4[:-1] if "error" in e]
    assert error["message"].startswith("internal error while finishing this request")
    assert error["code"] == "internal_error"
    server.wait_idle()  # every block of both pools free, nothing in flight
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_failing_grpc_request_is_internal_and_the_next_is_served(server, reference_engine, monkeypatch):
    flaky = register_flaky_policy(monkeypatch)
    want = reference_run(reference_engine, PROMPT, greedy(1), flaky)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.CollabDecodeStub(channel)

        def generate(seed: int):
            sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=seed, ignore_eos=True)
            return stub.Generate(pb.GenerateRequest(text=PROMPT, routing=flaky, sampling=sampling), timeout=120)

        with pytest.raises(grpc.RpcError) as e:
            generate(DECIDE_FAILS)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert e.value.details().startswith("internal error while routing this request")
        assert list(generate(1).token_ids) == want.output_ids
    server.wait_idle()


HUGE = 2**63  # one past int64
OUT_OF_RANGE = {  # field value -> the field the 400 names
    "temperature beyond float32": ({"temperature": 1e39}, "temperature"),
    "temperature NaN": (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    "temperature Infinity": (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    "top_p underflows to 0": (b'{"prompt": "x", "top_p": 1e-400}', "top_p"),
    "top_k beyond int64": ({"top_k": HUGE}, "top_k"),
    "max_tokens beyond int64": ({"max_tokens": HUGE}, "max_tokens"),
    "seed beyond uint64": ({"seed": 2**64}, "seed"),
    "seed below int64": ({"seed": -2**63 - 1}, "seed"),
    "stop token id negative": ({"stop_token_ids": [5, -1]}, "stop_token_ids"),
    "stop token id beyond int64": ({"stop_token_ids": [HUGE]}, "stop_token_ids"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_numbers_the_engine_cannot_represent_are_400(server, case):
    fields, param = OUT_OF_RANGE[case]
    if isinstance(fields, bytes):
        r = httpx.post(f"{server.url}/v1/completions", content=fields, headers={"content-type": "application/json"},
                       timeout=60)
    else:
        r = httpx.post(f"{server.url}/v1/completions", json={**GOOD, **fields}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error
    good = httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=60)
    assert good.status_code == 200


@pytest.mark.parametrize("sampling, field", [(pb.SamplingParams(temperature=float("inf")), "temperature"),
                                             (pb.SamplingParams(temperature=float("nan")), "temperature"),
                                             (pb.SamplingParams(stop_token_ids=[-1]), "stop_token_ids")])
def test_grpc_numbers_out_of_range_are_invalid_argument(server, sampling, field):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.CollabDecodeStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sampling), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field)


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_underflowing_temperature_samples_like_greedy(server, temperature):
    def text(t: float, seed: int | None = None) -> str:
        body = {**GOOD, "max_tokens": MAX_TOKENS, "temperature": t, "seed": seed}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert text(temperature, seed=1) == text(temperature, seed=2) == text(0.0)
    with grpc.insecure_channel(server.grpc_target) as channel:  # float32 on the wire: 1e-45 arrives denormal
        stub = pb_grpc.CollabDecodeStub(channel)
        sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=1)
        assert stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sampling), timeout=60).text == text(0.0)


def test_engine_process_death_fails_everyone_and_health_reports_it():
    """What no request can cause: the engine process dies mid-stream. Every request in flight ends with an
    error (a stream: an error event, then [DONE]), /health answers 503 and new requests 503, at once."""
    before = set(multiprocessing.active_children())
    config = ServeConfig(port=0, grpc_port=0, log_level="warning")
    with running_server(config, EngineProcess(demo_engine)) as s:
        (engine_process,) = set(multiprocessing.active_children()) - before
        body = {**GOOD, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # decoding
            os.kill(engine_process.pid, signal.SIGKILL)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "error" in json.loads(events[-2]) and "engine" in json.loads(events[-2])["error"]["message"]
        wait_until(lambda: httpx.get(f"{s.url}/health").status_code == 503, "/health reports the dead engine")
        r = httpx.post(f"{s.url}/v1/completions", json=GOOD, timeout=60)
        assert r.status_code == 503, r.text


POISON = 300  # the token whose input embedding is NaN in the poisoned pair
NAN_PROMPT = [5, POISON, 17, 42]
INNOCENT_PROMPTS = [[5, 17, 42, 8], [100, 3, 7]]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A tiny pair whose logits are NaN for any request holding POISON, and what its innocent requests answer
    alone (greedy, random:0.5 routing: both models write)."""
    pair = make_poisoned_pair(tmp_path_factory.mktemp("poisoned"), POISON)
    reference = make_engine(*pair)
    want = [reference_run(reference, prompt, greedy(1), "random:0.5") for prompt in INNOCENT_PROMPTS]
    assert all(w.finish_reason == "length" for w in want)
    return pair, want


def poisoned_body(prompt: list[int], stream: bool = False) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 1,
            "ignore_eos": True, "routing": "random:0.5", "stream": stream, "return_provenance": True}


def tiny_model(pair) -> ServedModel:
    return ServedModel(name="tiny", small_dir=str(pair[0]), large_dir=str(pair[1]))


def test_nan_logits_fail_only_their_request_through_rest(poisoned, monkeypatch):
    (pair, want), config = poisoned, ServeConfig(port=0, grpc_port=0, log_level="warning")
    with running_server(config, functools.partial(make_engine, *pair), tiny_model(pair)) as s:
        gate = install_gate(s, monkeypatch)
        gate.pause()  # the four requests share every step

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as client:
                return await run_held(s, gate, [
                    post(client, poisoned_body(INNOCENT_PROMPTS[0])),
                    stream(client, poisoned_body(INNOCENT_PROMPTS[1], stream=True)),
                    post(client, poisoned_body(NAN_PROMPT)), stream(client, poisoned_body(NAN_PROMPT, stream=True))])

        (status1, done1), (status2, events2), (status3, failed3), (status4, events4) = asyncio.run(main())
        assert status1 == 200 and done1["choices"][0]["token_ids"] == want[0].output_ids
        assert status2 == 200 and events2[-1] == "[DONE]"
        assert [t for e in events2[:-1] if e["choices"] for t in e["choices"][0]["token_ids"]] == want[1].output_ids
        nan_message = "logits for this request are not finite (NaN or inf)"
        assert status3 == 500 and nan_message in failed3["error"]["message"]
        assert failed3["error"]["code"] == "model_error"
        assert status4 == 200 and events4[-1] == "[DONE]"
        assert nan_message in events4[-2]["error"]["message"]
        s.wait_idle()


def test_nan_logits_through_the_engine_process(poisoned):
    """What `serve` runs: the engine in its own process; the failure and its message cross the pipe."""
    (pair, want), config = poisoned, ServeConfig(port=0, grpc_port=0, log_level="warning")
    with running_server(config, EngineProcess(functools.partial(make_engine, *pair)), tiny_model(pair)) as s:
        bad = httpx.post(f"{s.url}/v1/completions", json=poisoned_body(NAN_PROMPT), timeout=120)
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "model_error"
        assert bad.json()["error"]["message"].startswith("the small model's logits for this request are not finite")
        good = httpx.post(f"{s.url}/v1/completions", json=poisoned_body(INNOCENT_PROMPTS[0]), timeout=120)
        assert good.status_code == 200 and good.json()["choices"][0]["token_ids"] == want[0].output_ids
        s.wait_idle()
        assert httpx.get(f"{s.url}/health").json()["status"] == "ok"
