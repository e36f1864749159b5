"""The pairs collab-decode ships, by name: where their checkpoints live. A registry below both the
engine (which resolves `--pair NAME`) and the demo package (which trains and evaluates the demo pair)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).parent
SHIPPED_PAIRS: dict[str, Path] = {
    "demo": _PACKAGE / "demo" / "checkpoints",  # holds small/ and large/
}


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
