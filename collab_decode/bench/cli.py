"""`collab-decode bench engine | pair`: benchmarks that print figures (never asserted in tests)."""

from __future__ import annotations

import argparse


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench",
                           help="benchmarks: `bench engine` (native vs transformers), `bench pair` (demo pair)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, help_text in [("engine", "native engine vs transformers generate, batch 1 and 16 (see --help after --)"),
                            ("pair", "demo pair: accuracy vs large share per policy, batch-1 speed "
                                     "(see --help after --)")]:
        p = bench_sub.add_parser(name, help=help_text)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=f"arguments of collab_decode.bench.{name}_bench")
        p.set_defaults(func=cmd_bench, bench_module=name)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    importlib.import_module(f"collab_decode.bench.{args.bench_module}_bench").main(rest)
    return 0
