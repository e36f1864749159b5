"""The demo pair: a synthetic reasoning task and a small and a large model trained on it, shipped."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def checkpoint_dir(which: str) -> Path:
    """Directory of the shipped demo `small` or `large` checkpoint."""
    if which not in ("small", "large"):
        raise ValueError(f"demo model must be 'small' or 'large', got {which!r}")
    path = CHECKPOINTS / which
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the demo {which} checkpoint is missing at {path}; "
                                "train it with `collab-decode demo train`")
    return path
