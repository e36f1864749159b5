"""`collab-decode bench engine`: benchmarks that print figures (never asserted in tests)."""

from __future__ import annotations

import argparse


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: `bench engine` (native engine vs transformers generate)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    engine = bench_sub.add_parser("engine", help="native engine vs transformers generate, batch 1 and 16",
                                  add_help=False)
    engine.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of collab_decode.bench.engine_bench")
    engine.set_defaults(func=cmd_engine)


def cmd_engine(args: argparse.Namespace) -> int:
    from collab_decode.bench.engine_bench import main

    main(args.rest)
    return 0
