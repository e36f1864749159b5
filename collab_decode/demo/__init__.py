"""The demo pair: a synthetic reasoning task and a small and a large model trained on it, shipped."""

from __future__ import annotations

from pathlib import Path

from collab_decode.pairs import SHIPPED_PAIRS, pair_dir

CHECKPOINTS = SHIPPED_PAIRS["demo"]


def checkpoint_dir(which: str) -> Path:
    """Directory of the shipped demo `small` or `large` checkpoint."""
    return pair_dir("demo", which)
