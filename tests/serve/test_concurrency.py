"""32 concurrent streaming requests all complete and equal the engine's answers; cancelling half of them
mid-stream makes the engine itself drop those sequences (finish reason "abort", blocks freed) at once,
and so does a non-streaming client that goes away. An EngineGate holds the engine while the clients
leave, so an abort that never reached the engine shows as a sequence still alive: no test here depends
on how fast the machine decodes."""

from __future__ import annotations

import asyncio

import httpx
import openai

from collab_decode.sampling import SamplingParams
from tests.serve.conftest import PROMPT, assert_dropped_by_engine, delta, wait_until

NUM_REQUESTS = 32
MAX_TOKENS = 16
LONG_MAX_TOKENS = 400  # what a cancelled request would decode if its abort never reached the engine
NUM_CHUNKS_READ = 2  # chunks a cancelling client reads before it leaves
ABORTS = 'collab_decode_requests_total{outcome="abort"}'


def client_for(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


async def stream_text(client, i: int) -> tuple[str, str | None]:
    stream = await client.completions.create(model="demo", prompt=f"{PROMPT} {i}", max_tokens=MAX_TOKENS,
                                             temperature=0, stream=True)
    text, finish = "", None
    async for chunk in stream:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


async def stream_then_cancel(client, i: int) -> int:
    stream = await client.completions.create(model="demo", prompt=f"{PROMPT} {i}", max_tokens=LONG_MAX_TOKENS,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == NUM_CHUNKS_READ:
            break
    await stream.close()  # drops the connection mid-stream
    return seen


async def wait_async(condition, what: str, timeout: float = 60.0) -> None:
    await asyncio.to_thread(wait_until, condition, what, timeout)


def test_32_concurrent_streams_complete(server, reference_engine):
    server.wait_idle()

    async def main():
        client = client_for(server)
        try:
            return await asyncio.wait_for(asyncio.gather(*[stream_text(client, i) for i in range(NUM_REQUESTS)]), 300)
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == NUM_REQUESTS
    assert all(finish in ("stop", "length") and text for text, finish in results)
    # batched serving gives what the engine gives one request at a time (greedy)
    for i in (0, 17, 31):
        want = reference_engine.generate([f"{PROMPT} {i}"], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
        assert results[i] == (want.text, want.finish_reason)
    server.wait_idle()


def test_cancelling_half_mid_stream_drops_them_in_the_engine(server, gate, reference_engine):
    before = server.wait_idle()
    engine = server.engine
    gate.pause()  # nothing decodes until all 32 requests are in the engine: they then advance in lockstep

    def long_ones(seqs):
        return [s for s in seqs if s.sampling.ignore_eos]

    async def main():
        client = client_for(server)
        cancelling = completing = []
        try:
            cancelling = [asyncio.ensure_future(stream_then_cancel(client, i)) for i in range(1, NUM_REQUESTS, 2)]
            completing = [asyncio.ensure_future(stream_text(client, i)) for i in range(0, NUM_REQUESTS, 2)]
            await wait_async(lambda: len(engine.seqs) == NUM_REQUESTS, "all requests are in the engine")
            held = long_ones(list(engine.seqs.values()))  # the engine is paused: the dict holds still
            assert len(held) == NUM_REQUESTS // 2
            # decode until every long request has sent its chunks, then hold the engine there (a request whose
            # client already cancelled counts: it was dropped, and one preempted by a full pool catches up)
            gate.resume(until=lambda e: all(s.num_output_tokens >= NUM_CHUNKS_READ or s.finished for s in held))
            await asyncio.to_thread(gate.wait_paused)
            assert await asyncio.wait_for(asyncio.gather(*cancelling), 120) == [NUM_CHUNKS_READ] * len(held)
            for seq in held:  # the engine dropped each one while it was held: none could have finished
                await asyncio.to_thread(assert_dropped_by_engine, engine, seq)
            gate.resume()
            return await asyncio.wait_for(asyncio.gather(*completing), 300)
        finally:
            for task in cancelling + completing:
                task.cancel()
            await client.close()

    completed = asyncio.run(main())
    assert all(finish in ("stop", "length") for _, finish in completed)
    want = reference_engine.generate([f"{PROMPT} 0"], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
    assert completed[0] == (want.text, want.finish_reason)
    after = server.wait_idle()  # in flight 0, running 0, waiting 0, every block of both pools free
    assert delta(before, after, ABORTS) == NUM_REQUESTS // 2


def test_non_streaming_client_that_goes_away_is_dropped_by_the_engine(server, gate):
    before = server.wait_idle()
    gate.pause(lambda e: any(s.num_output_tokens >= 1 for s in e.seqs.values()))
    body = {"prompt": PROMPT, "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            request = asyncio.ensure_future(client.post(f"{server.url}/v1/completions", json=body))
            (seq,) = await asyncio.to_thread(gate.wait_paused)  # the request is decoding, and held
            request.cancel()  # the client gives up and closes its connection
            await asyncio.gather(request, return_exceptions=True)
        return seq

    seq = asyncio.run(main())
    assert_dropped_by_engine(server.engine, seq)
    gate.resume()
    after = server.wait_idle()
    assert delta(before, after, ABORTS) == 1
