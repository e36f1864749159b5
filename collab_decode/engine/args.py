"""Command-line flags of everything that builds an engine (`generate`, `serve`, `label`, ...), derived
from the config dataclasses so a setting is declared, documented and validated in one place.

    add_engine_args(parser) -> args -> engine_from_args(args) -> Engine
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from collab_decode.backends.remote import API_KEY_ENV as REMOTE_API_KEY_ENV
from collab_decode.backends.remote import RemoteConfig, remote_fields
from collab_decode.engine.config import EngineConfig
from collab_decode.engine.scheduler import SchedulerConfig
from collab_decode.pairs import pair_routers

CONFIGS = (EngineConfig, SchedulerConfig)
UNIT_NAMES = {1 << 20: "mib"}


def _flag(f: dataclasses.Field) -> tuple[str, str]:
    """(flag, dest) of a config field: memory fields in bytes take MiB on the command line."""
    unit = f.metadata.get("unit")
    name = f.name.replace("_bytes", "_" + UNIT_NAMES[unit]) if unit else f.name
    return "--" + name.replace("_", "-"), name


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model selection, neural routers, a remote large model (one --large-* flag per RemoteConfig field),
    plus one flag per EngineConfig / SchedulerConfig field."""
    g = parser.add_argument_group("models")
    g.add_argument("--model", help="a single model directory (Hugging Face format)")
    g.add_argument("--pair", help="a shipped pair by name: demo")
    g.add_argument("--small", help="small model directory of a pair")
    g.add_argument("--large", help="large model directory of a pair")
    g.add_argument("--backend", default="native", choices=["native", "transformers"], help="model implementation")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile (native backend; ~1 minute to compile on first use)")
    g.add_argument("--router", action="append", default=[], metavar="NAME=DIR",
                   help="a neural router checkpoint requests may name (repeatable; NAME defaults to the directory's "
                        "name; the first is what `neural` alone uses). Default with --pair: the pair's shipped "
                        "routers (demo: router_models/demo, named demo)")
    r = parser.add_argument_group("remote large model (an OpenAI-compatible endpoint: vLLM, collab-decode)")
    for f in remote_fields():
        r.add_argument("--large-" + f.name.replace("_", "-"), dest="large_" + f.name, type=f.metadata["type"] or
                       type(f.default), default=f.default, help=f"{f.metadata['help']} (default: {f.default!r})")
    e = parser.add_argument_group("engine")
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            if f.name == "scheduler":
                continue
            flag, dest = _flag(f)
            unit = f.metadata.get("unit")
            default = f.default // unit if unit else f.default
            if isinstance(default, bool):  # --flag / --no-flag
                e.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{f.metadata['help']}")  # (argparse adds the default)
                continue
            e.add_argument(flag, dest=dest, type=type(default), default=default,
                           help=f"{f.metadata['help']}{' (MiB)' if unit else ''} (default: {default!r})")


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    def values(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            if f.name != "scheduler":
                value = getattr(args, _flag(f)[1])
                out[f.name] = value * f.metadata["unit"] if f.metadata.get("unit") else value
        return out

    return EngineConfig(**values(EngineConfig), scheduler=SchedulerConfig(**values(SchedulerConfig)))


def remote_from_args(args: argparse.Namespace) -> RemoteConfig | None:
    """The remote large model's settings, or None when --large-url is not given."""
    if args.large_url is None:
        return None
    values = {f.name: getattr(args, "large_" + f.name) for f in remote_fields()}
    return RemoteConfig(**values, api_key=os.environ.get(REMOTE_API_KEY_ENV) or None)


def routers_from_args(values: list[str]) -> dict[str, Path]:
    """["NAME=DIR" | "DIR", ...] -> {name: dir}, in order; ValueError on a repeated name."""
    routers: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = (name, path) if sep else (Path(value).resolve().name, value)
        if name in routers:
            raise ValueError(f"router name {name!r} given twice (--router NAME=DIR)")
        routers[name] = Path(path)
    return routers


def engine_from_args(args: argparse.Namespace, policy_needs_large: bool = True):
    from collab_decode.engine.loading import build_engine, resolve_pair

    small, large = resolve_pair(args.pair, args.small, args.large)
    remote = remote_from_args(args)
    if args.model:
        if small or large or remote:
            raise SystemExit("error: give either --model or a pair (--pair / --small and --large or --large-url), "
                             "not both")
        small = args.model
    if small is None:
        raise SystemExit("error: no model: give --model DIR, --pair demo, or --small DIR --large DIR (or --large-url)")
    if not policy_needs_large:
        large = remote = None
    routers = routers_from_args(args.router) if args.router else pair_routers(args.pair)
    return build_engine(small, large, args.backend, args.dtype, args.device, config_from_args(args), args.compile,
                        routers, remote)
