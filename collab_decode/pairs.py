"""The pairs collab-decode ships, by name: where their checkpoints live. A registry below both the
engine (which resolves `--pair NAME`) and the demo package (which trains and evaluates the demo pair).
Also the fingerprint of a pair, which routing labels and routers record so they are never used with another."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_PACKAGE = Path(__file__).parent
SHIPPED_PAIRS: dict[str, Path] = {
    "demo": _PACKAGE / "demo" / "checkpoints",  # holds small/ and large/
}


# Routers trained for a shipped pair, loaded by `--pair NAME` unless --router is given. They live in the source
# tree beside the package (router_models/); an install without them serves the pair without a neural router.
SHIPPED_ROUTERS: dict[str, dict[str, Path]] = {
    "demo": {"demo": _PACKAGE.parent / "router_models" / "demo"},
}


def pair_routers(name: str | None) -> dict[str, Path]:
    """The shipped routers of pair `name` that are present here, by router name (none for other pairs)."""
    routers = SHIPPED_ROUTERS.get(name or "", {})
    return {router: path for router, path in routers.items() if (path / "config.json").is_file()}


def pair_dir(name: str, which: str) -> Path:
    """The `small` or `large` checkpoint directory of a shipped pair."""
    if name not in SHIPPED_PAIRS:
        raise ValueError(f"unknown pair {name!r}; shipped pairs: {', '.join(SHIPPED_PAIRS)}")
    if which not in ("small", "large"):
        raise ValueError(f"{name} model must be 'small' or 'large', got {which!r}")
    path = SHIPPED_PAIRS[name] / which
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the {name} {which} checkpoint is missing at {path}"
                                + ("; train it with `collab-decode demo train`" if name == "demo" else ""))
    return path


_CONFIG_KEYS_NOT_THE_MODEL = ("transformers_version", "_name_or_path", "_commit_hash")


def pair_fingerprint(vocab: dict[str, int], small_config: dict) -> str:
    """What a pair's routing data and routers are tied to: a hash of the tokenizer's vocabulary (string ->
    id) and the small model's config.json (the router reads the small model's hidden states and embeddings).
    Keys that name a file or a library version, not the model, are left out."""
    config = {k: v for k, v in small_config.items() if k not in _CONFIG_KEYS_NOT_THE_MODEL}
    payload = json.dumps({"vocab": sorted(vocab.items()), "small_config": config}, sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

