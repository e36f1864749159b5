"""The engine in a process of its own (what `serve` runs): REST and gRPC answers equal the engine's, with
logprobs and usage; streams; a client that goes away frees its blocks in the engine process (seen through
/metrics, the only window into that process); bad requests get 400 while everyone else is served; an engine
that cannot be built fails the server's start with its error."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time

import grpc
import httpx
import pytest

from collab_decode.sampling import SamplingParams
from collab_decode.serve.async_engine import AsyncEngine, EngineStopped
from collab_decode.serve.engine_core import EngineCoreClient, EngineProcess
from collab_decode.serve.grpc_gen import collab_decode_pb2 as pb
from collab_decode.serve.grpc_gen import collab_decode_pb2_grpc as pb_grpc
from collab_decode.serve.server import ServeConfig
from tests.serve.conftest import DEFAULT_POLICY, PROMPT, demo_engine, reference_run, running_server


def broken_engine():
    raise ValueError("no model in /nowhere")


def slow_demo_engine(step_s: float):
    """The demo engine, each step `step_s` longer: long enough to send requests within one step."""
    engine = demo_engine()
    step = engine.step

    def slow_step():
        time.sleep(step_s)
        return step()

    engine.step = slow_step
    return engine


@pytest.fixture(scope="module")
def served():
    started = time.monotonic()
    with running_server(ServeConfig(port=0, grpc_port=0, log_level="warning"), EngineProcess(demo_engine)) as s:
        s.started = started
        yield s


def test_answers_equal_the_engine_rest_and_grpc(served, reference_engine):
    sampling = SamplingParams(max_tokens=24, temperature=0.0, logprobs=2)
    want = reference_run(reference_engine, PROMPT, sampling, "entropy:0.6")
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "logprobs": 2, "routing": "entropy:0.6",
            "return_provenance": True}
    got = httpx.post(f"{served.url}/v1/completions", json=body, timeout=60).json()
    choice = got["choices"][0]
    assert choice["text"] == want.output_text and choice["provenance"] == want.provenance
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    assert got["usage"]["large_tokens"] == want.stats.num_large_tokens
    streamed = []
    with httpx.stream("POST", f"{served.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        streamed = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert len(streamed) >= 2  # the first token at once, then the steps of every few milliseconds together
    # the engine process detokenizes when it sends: text comes with the tokens, from the first chunk on
    texts = [json.loads(line[len("data: "):])["choices"][0]["text"] for line in streamed]
    assert "".join(texts) == want.output_text and texts[0]  # (the first token is sent at once)
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.CollabDecodeStub(channel)
        request = pb.GenerateRequest(text=PROMPT, routing="entropy:0.6",
                                     sampling=pb.SamplingParams(max_tokens=24, temperature=0.0))
        texts = [m.text for m in stub.GenerateStream(request, timeout=60)]
        assert "".join(texts) == want.output_text
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60)
        assert info.default_policy == DEFAULT_POLICY and info.max_model_len == reference_engine.max_model_len


def test_abandoned_stream_frees_its_blocks_and_bad_requests_get_400(served):
    body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk: the server aborts the request
    bad = httpx.post(f"{served.url}/v1/completions", json={"prompt": [10**6], "max_tokens": 4}, timeout=60)
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]["message"]
    metrics = served.wait_idle()  # in flight, waiting, running and every KV block: back to 0
    assert metrics['collab_decode_requests_total{outcome="abort"}'] >= 1
    assert metrics["collab_decode_engine_step_seconds_count"] > 0
    # steps run one after another: each engine-process step observed once, never more time than has passed
    assert metrics["collab_decode_engine_step_seconds_sum"] < time.monotonic() - served.started
    ok = httpx.post(f"{served.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_an_engine_that_cannot_be_built_fails_the_start():
    with pytest.raises(ValueError, match="no model in /nowhere"):
        with running_server(ServeConfig(port=0, grpc_port=0, log_level="warning"), EngineProcess(broken_engine)):
            pass


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_logprobs_and_several_choices_cross_the_pipe(served, reference_engine, stream):
    """The engine process folds a sequence's steps into one output per send: prompt logprobs come once, with
    a choice's first tokens, and every choice's tokens and logprobs arrive whole, streamed or not."""
    sampling = SamplingParams(max_tokens=30, temperature=0.0, logprobs=1, prompt_logprobs=1)
    want = reference_run(reference_engine, PROMPT, sampling, "entropy:0.6")
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "logprobs": 1, "prompt_logprobs": 1, "n": 2,
            "routing": "entropy:0.6", "return_provenance": True, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as r:
            events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: {")]
        choices = {}
        for event in events:
            for c in event["choices"]:
                got = choices.setdefault(c["index"], {"token_ids": [], "logprobs": [], "prompt_logprobs": []})
                got["token_ids"] += c["token_ids"]
                got["logprobs"] += c["logprobs"]["token_logprobs"]
                if c.get("prompt_logprobs") is not None:
                    got["prompt_logprobs"].append(c["prompt_logprobs"])
        choices = [choices[i] for i in range(2)]
        for c in choices:
            assert len(c["prompt_logprobs"]) == 1  # once per choice
            c["prompt_logprobs"] = c["prompt_logprobs"][0]
    else:
        out = httpx.post(f"{served.url}/v1/completions", json=body, timeout=60).json()
        choices = [{"token_ids": c["token_ids"], "logprobs": c["logprobs"]["token_logprobs"],
                    "prompt_logprobs": c["prompt_logprobs"]} for c in out["choices"]]
    prompt_ids = want.prompt_ids
    for c in choices:
        assert c["token_ids"] == want.output_ids
        assert c["logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
        scored = c["prompt_logprobs"]
        assert scored[0] is None and len(scored) == len(prompt_ids)
        got = [entry[str(token)]["logprob"] for entry, token in zip(scored[1:], prompt_ids[1:])]
        assert got == pytest.approx([lp for lp, _, _ in want.prompt_logprobs[1:]], abs=1e-5)


def test_a_command_longer_than_the_pipe_buffer_reaches_a_busy_engine():
    """The client announces each command (a count in shared memory) before it writes it, and the engine process
    reads only what is announced (serve/engine_core.py): a command larger than the pipe's buffer (a prompt of
    ~3 MB of ids) must still reach an engine that is busy stepping another request, and be refused there
    (longer than the context), while the running request goes on to its end."""
    client = EngineCoreClient(demo_engine)
    try:
        # the large model alone: ~300 tokens take over a second, the refusal comes in a fraction of one
        sampling = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
        running = client.add_request(client.tokenizer.encode(PROMPT), sampling, "large")
        while not client.step():
            pass
        refused = []
        adder = threading.Thread(target=lambda: refused.append(_refusal(client, [100] * 1_500_000)), daemon=True)
        adder.start()
        adder.join(timeout=60)
        assert not adder.is_alive(), "the long command never reached the engine process"
        assert isinstance(refused[0], ValueError) and "context length" in str(refused[0])
        # read while it was running: the request's end was not sent before the refusal (an engine that read the
        # command only once idle would have sent its end first: the reader queues messages in order)
        client.step()
        assert client.has_unfinished()
        tokens = 0
        while client.has_unfinished():
            tokens += sum(len(out.new_token_ids) for out in client.step() if out.seq_id == running)
        assert tokens > 0
    finally:
        client.close()


def _refusal(client: EngineCoreClient, prompt_ids: list[int]) -> Exception | None:
    try:
        client.add_request(prompt_ids, SamplingParams(max_tokens=4, temperature=0.0))
    except Exception as e:
        return e
    return None


def test_requests_that_come_during_a_step_start_together_after_it():
    """The engine thread sends each request as it comes, without waiting for the engine process's answer to the
    one before: two requests that arrive during one step are both added when it ends, so their first tokens come
    from the same step. (Waiting for the first one's answer held the second back a whole step: at concurrency 64
    a new request's first token came ~2.5 steps after it arrived.) A refused request still gets its error."""
    step_s = 0.4

    async def first_token_at(engine: AsyncEngine, prompt_ids: list[int], delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        async with await engine.add_request(prompt_ids, SamplingParams(max_tokens=2, temperature=0.0)) as stream:
            async for delta in stream:
                if delta.token_ids:
                    return time.perf_counter()

    async def run() -> None:
        engine = AsyncEngine(EngineProcess(functools.partial(slow_demo_engine, step_s)))
        engine.start()
        try:
            await engine.wait_ready()
            encode = engine.engine.tokenizer.encode
            running = await engine.add_request(encode(PROMPT), SamplingParams(max_tokens=12, temperature=0.0,
                                                                               ignore_eos=True))
            await running.__anext__()  # a step has just ended: the next one has begun
            # both within that step, an eighth of a step apart; prompts that share no block (two requests that
            # share one are admitted a step apart, so that one prefills it)
            first, second = await asyncio.gather(first_token_at(engine, encode(PROMPT), step_s / 8),
                                                 first_token_at(engine, encode("Bo has 17 shells."), step_s / 4))
            assert abs(second - first) < step_s / 2, "the second request started a step after the first"
            with pytest.raises(ValueError, match="out of range"):
                await engine.add_request([10**6], SamplingParams(max_tokens=2))
            assert (await running.collect())[-1].finished  # the running request went on
        finally:
            await engine.stop()

    asyncio.run(run())


def test_an_engine_process_that_dies_while_idle_fails_the_next_request():
    """The engine process dies while nothing runs (the server's engine thread is waiting for work): the next
    request finds it when it is sent, and gets EngineStopped instead of waiting forever; so does every later one,
    and the engine says it is not running (/health)."""
    async def run() -> None:
        engine = AsyncEngine(EngineProcess(demo_engine))
        engine.start()
        try:
            await engine.wait_ready()
            process = engine.engine._process
            process.kill()
            await asyncio.to_thread(process.join, 30)
            for _ in range(2):
                with pytest.raises(EngineStopped):
                    await asyncio.wait_for(engine.add_request([1, 2, 3], SamplingParams(max_tokens=2)), 30)
            assert not engine.is_running
        finally:
            await engine.stop()

    asyncio.run(run())
