"""Waiting with a timeout in the server's event loop, without losing a cancellation.

Before Python 3.12, `asyncio.wait_for` drops a cancellation of its caller that lands in the loop iteration
in which the awaited thing completes (CPython gh-86296): the caller gets the result and goes on as if never
cancelled. In the server that meant a gRPC handler whose client had cancelled went on waiting for the
engine's next delta, so the engine never heard the client was gone (tests/serve/test_async_engine.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(awaitable: Awaitable[T], timeout_s: float) -> T:
    """`awaitable`'s result, or asyncio.TimeoutError after timeout_s (<= 0: at once, nothing read); a
    cancellation of the caller always propagates. What is awaited is cancelled if it has not finished."""
    task = asyncio.ensure_future(awaitable)
    if timeout_s <= 0:
        task.cancel()  # before it ever runs
        raise asyncio.TimeoutError
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
    finally:
        task.cancel()  # a no-op once it finished
    if not done:
        raise asyncio.TimeoutError
    return task.result()
