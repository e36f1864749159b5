"""What a large-model forward of n new tokens costs on this machine: the catch-up chunk a routed token pays for.

    .venv/bin/python tools/chunk_costs.py [--chunks 1 8 32] [--threads 1 2] [--repeats 30] [--beside-small]
                                          [--profile]

The demo pair's large model, one sequence with 200 tokens cached, a chunk of n new tokens (its K/V written
at the same place each time), median of `repeats` forwards, per chunk size and torch threads. With
--beside-small, a second process decodes with the small model meanwhile (what the other core would do if the
large model followed each request on it: docs/benchmarks.md, Session 18). With --profile, the torch profiler's
table of 20 one-token forwards on one thread (which ops a decode step's time goes to).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch

from collab_decode.backends.base import ModelInput, SeqChunk
from collab_decode.demo import checkpoint_dir
from collab_decode.engine.loading import build_engine

CACHED = 200


def small_decoding(stop) -> None:
    """The small model decoding one sequence, over and over, until `stop` is set."""
    torch.set_num_threads(1)
    engine = build_engine(checkpoint_dir("small"))
    backend, kv = engine.backends["small"], engine.kv["small"]
    kv.allocate(-1, 480)
    table = kv.block_table(-1)
    with torch.inference_mode():
        while not stop.is_set():
            for position in range(CACHED, 400):
                backend.forward(ModelInput([SeqChunk(-1, [5], position, table)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--beside-small", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    engine = build_engine(checkpoint_dir("small"), checkpoint_dir("large"))
    backend, kv = engine.backends["large"], engine.kv["large"]
    kv.allocate(-1, CACHED + max(args.chunks))
    table = kv.block_table(-1)
    stop = helper = None
    if args.beside_small:
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        helper = ctx.Process(target=small_decoding, args=(stop,), daemon=True)
        helper.start()
        time.sleep(5)  # its model loaded and decoding
    try:
        with torch.inference_mode():
            backend.forward(ModelInput([SeqChunk(-1, [5] * CACHED, 0, table)]))
            for threads in args.threads:
                torch.set_num_threads(threads)
                for n in args.chunks:
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        backend.forward(ModelInput([SeqChunk(-1, [5] * n, CACHED, table)]))
                        times.append(time.perf_counter() - start)
                    print(f"{threads} thread(s), {n:3d} new tokens: {1e3 * statistics.median(times):.2f} ms"
                          + (" (the small model decoding beside it)" if helper else ""), flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                torch.set_num_threads(1)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(20):
                        backend.forward(ModelInput([SeqChunk(-1, [5], CACHED, table)]))
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    finally:
        if helper:
            stop.set()
            helper.join(timeout=10)


if __name__ == "__main__":
    main()
