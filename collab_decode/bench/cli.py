"""`collab-decode bench run | load | engine | pair | remote | router | wait`: benchmarks that print and write
figures (never asserted in tests). `run` is the whole speed-against-accuracy report of the demo pair, engine
and server; `load` drives a server that is already running."""

from __future__ import annotations

import argparse


def add_bench_parser(sub) -> None:
    from collab_decode.bench import suite

    bench = sub.add_parser("bench", help="benchmarks: `bench run` (the full report), `bench load` (a running "
                                         "server), `bench engine`, `bench pair`, `bench remote`, `bench router`, "
                                         "`bench wait`")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    run = bench_sub.add_parser("run", help="demo pair: accuracy, speedup and bound per policy, engine and server "
                                          "side by side; writes report.json/.md, pareto.png, answers.html",
                               description=suite.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite.run_parser(run)
    load = bench_sub.add_parser("load", help="drive a running server at fixed concurrencies: throughput and "
                                            "latency percentiles per policy",
                                description="Drive a running `collab-decode serve --pair demo` (REST, and gRPC "
                                            "with --grpc-target) with demo problems at each concurrency.")
    suite.load_parser(load)
    for p in (run, load):
        p.set_defaults(func=cmd_suite)
    for name, help_text in [("engine", "native engine vs transformers generate, batch 1 and 16 (see --help after --)"),
                            ("pair", "demo pair: accuracy vs large share per policy, batch-1 speed "
                                     "(see --help after --)"),
                            ("remote", "demo pair with the large model local vs behind --large-url: ms per large "
                                       "call, break-even large share (see --help after --)"),
                            ("router", "demo pair: neural router vs entropy vs random, accuracy against large "
                                       "share, router cost (see --help after --)"),
                            ("wait", "demo pair at one batch: routed tokens waiting to share a large-model call "
                                     "(--large-wait-steps), tokens/s and large calls (see --help after --)")]:
        p = bench_sub.add_parser(name, help=help_text)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=f"arguments of collab_decode.bench.{name}_bench")
        p.set_defaults(func=cmd_bench, bench_module=name)


def cmd_suite(args: argparse.Namespace) -> int:
    import sys

    # what followed `collab-decode bench run|load` on the command line, for the report
    from_cli = sys.argv[1:3] == ["bench", args.bench_command]
    args.argv = sys.argv[3:] if from_cli else ["(arguments given from Python)"]
    args.suite(args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    importlib.import_module(f"collab_decode.bench.{args.bench_module}_bench").main(rest)
    return 0
