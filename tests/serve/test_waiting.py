"""serve.waiting.wait_for: asyncio.wait_for's contract, except that the caller's cancellation always wins."""

from __future__ import annotations

import asyncio

import pytest

from collab_decode.serve.waiting import wait_for


def test_it_returns_the_result_or_times_out_and_cancels_what_it_waited_for():
    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait("ready")
        assert await wait_for(queue.get(), 1.0) == "ready"
        get = queue.get()
        with pytest.raises(asyncio.TimeoutError):
            await wait_for(get, 0.01)
        with pytest.raises(asyncio.TimeoutError):  # no time left: nothing is read
            queue.put_nowait("kept")
            await wait_for(queue.get(), 0.0)
        assert queue.get_nowait() == "kept"

    asyncio.run(main())


def test_a_cancel_in_the_iteration_the_result_arrives_is_not_dropped():
    """The race asyncio.wait_for loses before Python 3.12 (gh-86296): the item arrives and the waiter is
    cancelled before it resumes. The waiter must end cancelled, not carry on with the item."""
    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        got = []

        async def reader():
            while True:
                got.append(await wait_for(queue.get(), 600))

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0.01)  # the reader waits in get()
        queue.put_nowait("delta")
        await asyncio.sleep(0)  # the get completes; the reader has not resumed
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        assert task.cancelled()

    asyncio.run(main())
