"""Files of a labelling run, each written atomically (a temporary file, then a rename), so a file that exists
is whole: a killed run leaves finished shards and at most a stray `.NAME.PID.tmp`, which the rerun removes.

Shard files hold no time or anything else that varies between runs: the same inputs give the same bytes
(times live in timing/ and the manifest's timing section only).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch


def shard_name(k: int) -> str:
    return f"{k:05d}"


def _tmp(path: Path) -> Path:
    """Where `path` is written before its rename: hidden, and per process (workers may write the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_partial_files(root: Path) -> None:
    """Delete what killed runs left half-written (call while no other process writes under `root`)."""
    for tmp in root.rglob(".*.tmp"):
        tmp.unlink()


def write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def write_jsonl(path: Path, records: list) -> None:
    """Dataclasses or dicts, one JSON object per line."""
    lines = [json.dumps(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r) for r in records]
    write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: Path, cls=None) -> list:
    """One object per line; built into `cls` (a dataclass) if given."""
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [cls(**r) for r in records] if cls is not None else records


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = _tmp(path)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
