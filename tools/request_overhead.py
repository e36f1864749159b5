"""What one request costs the server beyond the engine's work: `serve` on the demo pair, requests one at a time
over REST (httpx), streamed and not, of 1 token (nearly all of it the server's path: HTTP, the API process,
the engine process's pipe) and of 32 tokens.

    .venv/bin/python tools/request_overhead.py [--requests 60] [--rounds 2]

Prints the median round trip of each kind per round. At concurrency 1 every millisecond here is a millisecond
the engine waits between two requests (bench run's REST / engine line).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from collab_decode.bench.suite import ServerProcess
from collab_decode.demo import checkpoint_dir
from collab_decode.pairs import pair_routers
from collab_decode.serve.cli import default_threads, usable_cores

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


async def round_trip(client: httpx.AsyncClient, stream: bool, max_tokens: int) -> float:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "routing": "small", "stream": stream,
            "ignore_eos": True}
    start = time.perf_counter()
    if stream:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass
    else:
        (await client.post("/v1/completions", json=body)).json()
    return time.perf_counter() - start


async def measure(url: str, requests: int, rounds: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        for stream in (True, False):  # warm-up
            await round_trip(client, stream, 4)
        for r in range(rounds):
            for stream in (True, False):
                for max_tokens in (1, 32):
                    times = [await round_trip(client, stream, max_tokens) for _ in range(requests)]
                    print(f"round {r + 1}: {'streamed' if stream else 'not streamed'}, {max_tokens} token(s): "
                          f"median {1e3 * statistics.median(times):.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    routers = [f"{name}={path}" for name, path in pair_routers("demo").items()]
    server = ServerProcess(str(checkpoint_dir("small")), str(checkpoint_dir("large")), default_threads(), routers,
                           usable_cores())
    try:
        asyncio.run(measure(server.url, args.requests, args.rounds))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
