"""What the server's engine process costs a batch-1 request, without HTTP: the same engine in this process
and in an engine process driven by its client (serve/engine_core.py), one request at a time, alternated.

    .venv/bin/python tools/engine_process_limits.py [--problems 24] [--passes 3] [--policies small neural:0.7]
                                                     [--rest]

With --intervals-ms, one engine process for each stream interval (how often it sends its outputs), driven in
turn. All engines are `serve`'s (built by build_serving_engine from `serve --pair demo`'s arguments, its threads and
chunk threads). Per pass and policy: tokens/s in process and through the client, their ratio, and where the
engine process's time went a token: inside Engine.step (the step durations it sends) and outside it (its loop:
the poll for commands, folding outputs, the sends), against the in-process engine's step time a token. With
--rest, the same requests through `serve` over REST too (streamed, as `bench run`'s load generator sends
them): what HTTP and the server's process add on top.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time

import torch

from collab_decode.bench.measure import drive_engine
from collab_decode.bench.workload import demo_workload
from collab_decode.cli import build_parser
from collab_decode.serve.cli import build_serving_engine, resolve_defaults
from collab_decode.serve.engine_core import STREAM_INTERVAL_S, EngineCoreClient


def drive_client(client: EngineCoreClient, workload, policy: str) -> dict:
    """Requests one at a time through the engine process: tokens/s, and its step seconds a token."""
    sampling, tokens, step_s = workload.sampling(), 0, 0.0
    start = time.perf_counter()
    for i in range(len(workload)):
        client.add_request(workload.request(i), sampling, policy)
        while client.has_unfinished():
            for out in client.step():
                tokens += len(out.new_token_ids)
            step_s += sum(client.step_seconds)
    seconds = time.perf_counter() - start
    return {"tok/s": tokens / seconds, "step ms/tok": 1e3 * step_s / tokens,
            "outside ms/tok": 1e3 * (seconds - step_s) / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=24)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=["small", "neural:0.7"])
    parser.add_argument("--rest", action="store_true", help="also through `serve` over REST")
    parser.add_argument("--intervals-ms", nargs="+", type=float, default=[STREAM_INTERVAL_S * 1e3],
                        help="one engine process for each of these stream intervals (how often it sends)")
    args = parser.parse_args()
    serve_args = resolve_defaults(build_parser().parse_args(["serve", "--pair", "demo", "--log-level", "warning",
                                                                "--no-enable-prefix-caching"]))
    engine = build_serving_engine(serve_args)  # sets this process's torch threads as serve's engine process does
    clients = {ms: EngineCoreClient(functools.partial(build_serving_engine, serve_args), ms / 1e3)
               for ms in args.intervals_ms}
    workload = demo_workload(engine.tokenizer, args.problems)
    server = loop = sender = None
    if args.rest:
        from collab_decode.bench.load import RestSender, drive_server
        from collab_decode.bench.suite import ServerProcess

        from collab_decode.pairs import pair_routers
        from collab_decode.serve.cli import engine_dirs

        small, large = engine_dirs(serve_args)
        routers = [f"{name}={path}" for name, path in pair_routers("demo").items()]
        server = ServerProcess(str(small), str(large), serve_args.threads, routers, serve_args.chunk_threads)
        loop = asyncio.new_event_loop()
        sender = loop.run_until_complete(_make_sender(RestSender, server.url, workload))
    print(f"{args.problems} problems, threads {torch.get_num_threads()}, chunk threads {serve_args.chunk_threads}; "
          "warming up", flush=True)
    warm = demo_workload(engine.tokenizer, 2)
    for policy in args.policies:
        drive_engine(engine, warm, policy, 1, len(warm))
        for client in clients.values():
            drive_client(client, warm, policy)
        if sender:
            loop.run_until_complete(drive_server(sender, policy, len(warm), 1))
    rows: dict[str, list[float]] = {}
    try:
        for p in range(args.passes):
            for policy in args.policies:
                m = drive_engine(engine, workload, policy, 1, len(workload))
                inproc = {"tok/s": m.tokens_per_s, "step ms/tok": 1e3 * m.steps.step_s / m.num_tokens}
                values = {"in-process tok/s": inproc["tok/s"], "in-process step ms/tok": inproc["step ms/tok"]}
                for ms, client in clients.items():
                    proc, name = drive_client(client, workload, policy), f"process {ms:g} ms"
                    values.update({f"{name} tok/s": proc["tok/s"],
                                   f"{name} / in-process": proc["tok/s"] / inproc["tok/s"],
                                   f"{name} step ms/tok": proc["step ms/tok"],
                                   f"{name} outside steps ms/tok": proc["outside ms/tok"]})
                if sender:
                    rest = loop.run_until_complete(drive_server(sender, policy, len(workload), 1))
                    values["rest tok/s"] = rest.tokens_per_s
                    values["rest / in-process"] = rest.tokens_per_s / inproc["tok/s"]
                for name, value in values.items():
                    rows.setdefault(f"{policy}: {name}", []).append(value)
                print(f"pass {p + 1}/{args.passes} {policy}: "
                      + ", ".join(f"{k} {v:.3f}" if v < 10 else f"{k} {v:.0f}" for k, v in values.items()), flush=True)
    finally:
        for client in clients.values():
            client.close()
        if server:
            loop.run_until_complete(sender.close())
            server.stop()
    print(f"\nmedians over {args.passes} passes:")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"  {name:45} {median:.3f}" if median < 10 else f"  {name:45} {median:.1f}")


async def _make_sender(cls, url, workload):
    return cls(url, workload)


if __name__ == "__main__":
    main()
