"""`collab-decode serve`: REST (OpenAI-compatible) and gRPC in one process over one engine thread."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import re
import sys
from pathlib import Path

from collab_decode.pairs import pair_routers
from collab_decode.serve.engine_core import STREAM_INTERVAL_S
from collab_decode.serve.limits import Limits
from collab_decode.serve.server import ServeConfig

API_KEY_ENV = "COLLAB_DECODE_API_KEY"
# a pair with a neural router (the demo pair's shipped one, or --router): its calibrated threshold, on the
# README's question 2.8% large share, right (router_models/demo/README.md)
ROUTED_DEFAULT_POLICY = "neural"
# a pair without one: ~15% large share on the demo pair, a cautious rule (docs/results/pair)
PAIR_DEFAULT_POLICY = "entropy:0.009"


_SERVING = re.compile(r"REST (http://\S+)/v1, gRPC (\S+:\d+)")


def serving_addresses(text: str) -> tuple[str, str] | None:
    """(REST base URL, gRPC target) from the line `serve` prints once it listens, if `text` holds it (how
    the benchmark and the soak find a server started on free ports)."""
    m = _SERVING.search(text)
    return (m.group(1), m.group(2)) if m else None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """One torch thread fewer than this process may use, at least one: the event loop, the network and the
    OS keep a core of their own (as vLLM's CPU backend reserves one for its API server). An OpenMP
    thread that something else preempts stalls every op of the engine (docs/benchmarks.md)."""
    return max(1, usable_cores() - 1)


def add_serve_parser(sub) -> None:
    from collab_decode.engine.args import add_engine_args

    serve = sub.add_parser(
        "serve", help="serve a model pair over OpenAI-compatible REST and gRPC",
        description="Serve a small-large pair (default: the shipped demo pair) over REST (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics) and gRPC (protos/collab_decode/v1), "
                    "one process, one engine thread. Requests choose routing with the `routing` extension "
                    '(e.g. {"policy": "entropy", "threshold": 0.6}); usage reports small and large token counts.')
    add_engine_args(serve)
    policy = serve._option_string_actions["--default-policy"]
    policy.default = None
    policy.help = (f"routing policy for requests that name none (default: {ROUTED_DEFAULT_POLICY} for a pair "
                   f"with a neural router, as the demo pair, {PAIR_DEFAULT_POLICY} for a pair without one, small "
                   "for one model)")
    chunk = serve._option_string_actions["--chunk-threads"]
    chunk.default = usable_cores()
    chunk.help = ("torch threads for a large-model forward of at least 8 new tokens (its catch-up, a prompt) "
                  "while at most --chunk-threads-max-batch sequences run: the server's own process is nearly idle "
                  f"then (default: every core this process may use, {usable_cores()} here; 0: --threads)")
    serve._option_string_actions["--pair"].help = "a shipped pair by name (default: demo, unless --model or " \
                                                   "--small/--large is given)"
    s = serve.add_argument_group("server")
    s.add_argument("--host", default=ServeConfig.host, help=f"interface to listen on (default: {ServeConfig.host})")
    s.add_argument("--port", type=int, default=ServeConfig.port, help=f"REST port (default: {ServeConfig.port})")
    s.add_argument("--grpc-port", type=int, default=ServeConfig.grpc_port,
                   help=f"gRPC port (default: {ServeConfig.grpc_port})")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 and gRPC calls (default: ${API_KEY_ENV} if set, "
                        "else no key)")
    s.add_argument("--max-queue", type=int, default=ServeConfig.max_queue,
                   help="most requests (sequences) in flight, queued or running, before HTTP 429 / RESOURCE_EXHAUSTED "
                        f"(default: {ServeConfig.max_queue})")
    s.add_argument("--served-model-name", default=None,
                   help="the model name requests use (default: the pair's name, or the model directories' names)")
    s.add_argument("--log-level", default=ServeConfig.log_level,
                   choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--threads", type=int, default=default_threads(),
                   help="torch threads of the engine (default: the cores this process may use, less one for the "
                        f"event loop and the network: {default_threads()} here)")
    s.add_argument("--stream-interval-ms", type=float, default=STREAM_INTERVAL_S * 1e3,
                   help="how often the engine process sends its outputs: a stream gets the tokens of that long at "
                        "once (a request's first token and its end at once); lower for smoother streams at some "
                        f"tokens/s, 0 for every step (default: {STREAM_INTERVAL_S * 1e3:g})")
    for f in _documented_fields(ServeConfig):
        s.add_argument(_flag(f), dest=f.name, type=f.metadata["type"], default=f.default, metavar=_metavar(f),
                       help=f"{f.metadata['help']} (default: {f.default!r})")
    limits = serve.add_argument_group("limits (per request; README: Limits)")
    for f in _documented_fields(Limits):
        default = "" if f.default is None else f" (default: {f.default!r})"
        limits.add_argument(_flag(f), dest=f.name, type=f.metadata["type"], default=f.default, metavar=_metavar(f),
                            help=f"{f.metadata['help']}{default}")
    serve.set_defaults(func=cmd_serve)


def _documented_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _flag(f: dataclasses.Field) -> str:
    """A config field's flag: request_timeout_s -> --request-timeout (seconds say so in their help)."""
    return "--" + f.name.removesuffix("_s").replace("_", "-")


def _metavar(f: dataclasses.Field) -> str:
    return "SECONDS" if f.name.endswith("_s") else "N"


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(**{f.name: getattr(args, f.name) for f in _documented_fields(Limits)})


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Serve's defaults that depend on other flags: the demo pair when no model is named; the default
    policy by whether there is a large model."""
    if not (args.pair or args.model or args.small or args.large):
        args.pair = "demo"  # with --large-url alone: the demo small model beside the remote large one
    if args.default_policy is None:
        if args.model:
            args.default_policy = "small"
        else:
            has_router = bool(args.router or pair_routers(args.pair))
            args.default_policy = ROUTED_DEFAULT_POLICY if has_router else PAIR_DEFAULT_POLICY
    return args


def served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.pair:
        return args.pair
    dirs = [d for d in (args.small, args.large) if d] or [args.model]
    return "+".join(Path(d).resolve().name for d in dirs)


def cmd_serve(args: argparse.Namespace) -> int:
    from collab_decode.engine.args import routers_from_args
    from collab_decode.routing import parse_routing
    from collab_decode.serve.engine_core import EngineProcess
    from collab_decode.serve.requests import ServedModel
    from collab_decode.serve.server import Server

    resolve_defaults(args)
    config = ServeConfig(host=args.host, port=args.port, grpc_port=args.grpc_port,
                         api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                         max_queue=args.max_queue, log_level=args.log_level, drain_timeout_s=args.drain_timeout_s,
                         limits=limits_from_args(args))
    parse_routing(args.default_policy)  # a malformed default fails before any model loads
    if args.stream_interval_ms < 0:
        print(f"error: --stream-interval-ms must be >= 0, got {args.stream_interval_ms:g}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    routers = tuple(routers_from_args(args.router))  # names; requests never see paths
    small, large = engine_dirs(args)
    model = ServedModel(name=served_model_name(args), small_dir=str(small), large_dir=large, routers=routers)

    def announce(server: Server) -> None:
        print(f"collab-decode: serving {model.name!r} (default policy {args.default_policy}): "
              f"REST http://{config.host}:{server.port}/v1, gRPC {config.host}:{server.grpc_port}"
              + ("; API key required" if config.api_key else "") + ". Ctrl-C stops.", flush=True)

    try:
        # the engine in its own process
        engine = EngineProcess(functools.partial(build_serving_engine, args), args.stream_interval_ms / 1e3)
        asyncio.run(Server(engine, model, config).run_until_signal(announce))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def build_serving_engine(args: argparse.Namespace):
    """The engine `serve` runs, built and warmed up by the thread that will step it: the main thread of the
    engine process (serve/engine_core.py). No other thread of that process runs a torch op, which would
    slow every op ~3x on a CPU, and the server's event loop, in its own process, takes no GIL from it
    (docs/benchmarks.md)."""
    import torch

    from collab_decode.engine.args import engine_from_args
    from collab_decode.routing import parse_routing
    from collab_decode.sampling import SamplingParams

    torch.set_num_threads(args.threads)  # no torch op has run yet: every op of the engine uses this many
    engine = engine_from_args(args)
    engine.router_for(parse_routing(args.default_policy))  # a bad default fails now, not on the first request
    # warm up the local models on this thread: a prefill chunk, then decode steps (compiled, with --compile);
    # a remote large model (a backend that reports `unavailable`) is left alone: it may not be up yet
    warm_up = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = [i % engine.vocab_size for i in range(1, 9)]
    large = engine.backends.get("large")
    for policy in ["small"] + (["large"] if large is not None and not hasattr(large, "unavailable") else []):
        engine.generate([prompt], warm_up, policy)
    return engine


def engine_dirs(args: argparse.Namespace) -> tuple[str, str | None]:
    from collab_decode.engine.loading import resolve_pair

    small, large = resolve_pair(args.pair, args.small, args.large)
    return (small or args.model), (args.large_url or large)
