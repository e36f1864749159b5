"""A request's choices: the engine requests behind one API request (n per prompt, one or more prompts),
read as one. The REST and gRPC adapters start them together and read them here:

    start_all(engine, jobs, routing)  every choice's engine request, added together (one step admits them)
    merge(streams)         (choice index, Delta) as each choice's engine request makes progress
    collect_all(streams)   every choice's deltas to the end (non-streaming answers)
    without_output(delta)  the delta of an echo-only choice (max_tokens 0): its one generated token dropped

A choice that fails (RequestFailed) fails the whole request; leaving early (the client went away) aborts
every choice still running, so each one's KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from collab_decode.sampling import SamplingParams
from collab_decode.serve.async_engine import AsyncEngine, Delta, RequestStream


async def start_all(engine: AsyncEngine, jobs: list[tuple[list[int], SamplingParams]], routing) -> list[RequestStream]:
    """Add each (prompt ids, sampling) to the engine together. If the engine refuses one (ValueError,
    EngineBusy, EngineStopped), the others are aborted and its error is raised."""
    started = await asyncio.gather(*(engine.add_request(ids, s, routing) for ids, s in jobs), return_exceptions=True)
    failures = [r for r in started if isinstance(r, BaseException)]
    if failures:
        for stream in started:
            if isinstance(stream, RequestStream):
                stream.abort()
        raise failures[0]
    return started


@contextlib.asynccontextmanager
async def opened(streams: list[RequestStream]):
    """Abort every choice still running on leaving (normally they have all finished by then)."""
    try:
        yield streams
    finally:
        for stream in streams:
            stream.abort()


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """(index, delta) from every stream in arrival order; raises the first choice's failure."""
    if len(streams) == 1:  # the usual request: no tasks needed
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((index, delta))
            queue.put_nowait((index, None))
        except Exception as e:  # RequestFailed: handed to the reader, which raises it
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(streams)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def collect_all(streams: list[RequestStream]) -> list[list[Delta]]:
    """Every choice's deltas, in choice order, once all have finished."""
    choices: list[list[Delta]] = [[] for _ in streams]
    async with contextlib.aclosing(merge(streams)) as deltas:
        async for index, delta in deltas:
            choices[index].append(delta)
    return choices


def without_output(delta: Delta) -> Delta:
    """An echo-only choice's delta: the engine generated one token (it always generates at least one), which
    the answer drops, with what it counted."""
    stats = {**delta.stats, "small_tokens": 0, "large_tokens": 0, "large_share": 0.0}
    return dataclasses.replace(delta, token_ids=[], text="", provenance=[], logprobs=[], top_logprobs=[],
                               finish_reason="length" if delta.finished else None, stats=stats)
