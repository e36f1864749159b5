"""AsyncEngine without a network: errors reach the caller and never stop the engine thread; the queue
bound; a failed step fails only the requests in flight; aborted and dropped streams end their sequence in
the engine itself (checked while an EngineGate holds the engine, so it cannot have finished by itself)."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from collab_decode.sampling import SamplingParams
from collab_decode.serve.async_engine import AsyncEngine, Delta, EngineBusy, EngineStopped
from tests.serve.conftest import PROMPT, EngineGate, assert_dropped_by_engine, demo_engine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return demo_engine()


@pytest.fixture(scope="module")
def prompt_ids(engine):
    return engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.fixture
def gate(engine, monkeypatch) -> EngineGate:
    gate = EngineGate(engine)
    monkeypatch.setattr(engine, "step", gate.step)
    return gate


def decoding(engine) -> bool:
    return any(s.num_output_tokens >= 1 for s in engine.seqs.values())


def run(engine, body, max_queue: int = 8, request_timeout_s: float = 0.0):
    """Run `body(async_engine)` on a fresh AsyncEngine over `engine`; check every block is free after."""
    async def main():
        async_engine = AsyncEngine(engine, max_queue, request_timeout_s=request_timeout_s)
        async_engine.start()
        try:
            return await asyncio.wait_for(body(async_engine), timeout=120)
        finally:
            await async_engine.stop()

    result = asyncio.run(main())
    assert not engine.has_unfinished()
    assert all(kv.num_used_blocks == 0 for kv in engine.kv.values())
    return result


def test_stream_equals_generate_and_errors_do_not_stop_the_thread(engine, prompt_ids):
    want = engine.generate([prompt_ids], GREEDY, "entropy:0.6")[0]

    async def body(ae):
        for bad in ([], prompt_ids * 100):
            with pytest.raises(ValueError):
                await ae.add_request(bad, GREEDY)
        with pytest.raises(ValueError, match="unknown routing policy"):
            await ae.add_request(prompt_ids, GREEDY, "oracle")
        stream = await ae.add_request(prompt_ids, GREEDY, "entropy:0.6")
        deltas = await stream.collect()
        assert ae.num_in_flight == 0
        return deltas

    deltas = run(engine, body)
    assert "".join(d.text for d in deltas) == want.text
    assert [p for d in deltas for p in d.provenance] == want.provenance
    assert deltas[-1].finished and deltas[-1].stats["large_tokens"] == want.stats["large_tokens"]


def test_queue_bound(engine, prompt_ids, gate):
    gate.pause(decoding)

    async def body(ae):
        first = await ae.add_request(prompt_ids, LONG)
        with pytest.raises(EngineBusy, match="capacity"):
            await ae.add_request(prompt_ids, GREEDY)
        await first.__anext__()
        (seq,) = await asyncio.to_thread(gate.wait_paused)
        first.abort()
        await asyncio.to_thread(assert_dropped_by_engine, engine, seq)
        gate.resume()
        again = await ae.add_request(prompt_ids, GREEDY)
        assert (await again.collect())[-1].finished

    run(engine, body, max_queue=1)


def test_failed_step_fails_requests_in_flight_only(engine, prompt_ids, monkeypatch):
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)

    async def body(ae):
        stream = await ae.add_request(prompt_ids, LONG)
        with pytest.raises(EngineStopped, match="the engine failed while running this request") as failed:
            await stream.collect()
        assert "boom" not in str(failed.value)  # the exception's text goes to the log, not to the client
        assert (await (await ae.add_request(prompt_ids, GREEDY)).collect())[-1].finished

    run(engine, body)


def test_dropped_stream_is_aborted_in_the_engine(engine, prompt_ids, gate):
    gate.pause(decoding)

    async def body(ae):
        stream = await ae.add_request(prompt_ids, LONG)
        await stream.__anext__()
        (seq,) = await asyncio.to_thread(gate.wait_paused)
        del stream  # never read to the end: its finalizer aborts the request
        gc.collect()
        await asyncio.to_thread(assert_dropped_by_engine, engine, seq)
        assert ae.num_in_flight == 0

    run(engine, body)


def test_a_cancel_arriving_with_a_delta_still_ends_the_request(engine, prompt_ids, gate):
    """A reader is cancelled in the loop iteration in which its next delta arrives (a gRPC client's cancel
    landing with the engine's delta). The cancellation must win: under a request timeout the stream used
    asyncio.wait_for, which on Python 3.11 returned the delta and dropped the cancel, so the handler waited
    for a next delta that never came and the engine never heard the client was gone."""
    gate.pause(decoding)

    async def body(ae):
        stream = await ae.add_request(prompt_ids, LONG)
        (seq,) = await asyncio.to_thread(gate.wait_paused)
        outputs = stream._request.outputs
        while not outputs.empty():  # what the engine sent before it paused
            outputs.get_nowait()

        async def reader():
            async with stream:  # leaving it aborts the request (as the gRPC handler's does)
                async for _ in stream:
                    pass

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0.05)  # the reader waits for its next delta
        outputs.put_nowait(Delta([1], "x", ["small"], [], [], None, False, None, len(prompt_ids), {}))
        await asyncio.sleep(0)  # the queue's get completes; the reader has not resumed yet
        task.cancel()
        await asyncio.wait({task}, timeout=10)
        assert task.cancelled()
        await asyncio.to_thread(assert_dropped_by_engine, engine, seq)
        gate.resume()

    run(engine, body, request_timeout_s=600)


def test_a_builder_runs_on_the_engine_thread_and_its_failure_reaches_the_caller(engine, prompt_ids):
    """Given a function that builds the engine, the engine thread calls it (so that thread alone runs the
    models' torch work); a builder that fails fails wait_ready with its error, and later requests."""
    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return engine

    def broken():
        raise ValueError("no such model directory")

    async def main():
        ae = AsyncEngine(build)
        ae.start()
        stream = await ae.add_request(prompt_ids, GREEDY)  # queued before the engine was ready
        await ae.wait_ready()
        assert ae.engine is engine and built_on == [ae._thread] and built_on[0] is not threading.main_thread()
        assert (await stream.collect())[-1].finished
        await ae.stop()
        failing = AsyncEngine(broken)
        failing.start()
        with pytest.raises(ValueError, match="no such model"):
            await failing.wait_ready()
        with pytest.raises(EngineStopped):
            await failing.add_request(prompt_ids, GREEDY)
        await failing.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert all(kv.num_used_blocks == 0 for kv in engine.kv.values())
