"""Load a Hugging Face checkpoint directory into the native Llama-family model.

A directory holds `config.json`, weights as one `model.safetensors` or shards listed in
`model.safetensors.index.json`, and tokenizer files. Everything is validated before the model is
returned (config fields, every expected tensor present, no unknown tensor, every shape right), so a
bad checkpoint fails with an error naming the problem and nothing is half-loaded. Weights are read
with safetensors only: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from collab_decode.models.config import ConfigError, ModelConfig
from collab_decode.models.layers import Linear
from collab_decode.models.registry import model_class

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded, with the reason."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path} has only pickle weights (*.bin/*.pt); convert them to safetensors")
    raise CheckpointError(f"{path} has no model.safetensors nor model.safetensors.index.json")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
        duplicated = set(part) & set(tensors)
        if duplicated:
            raise CheckpointError(f"tensor(s) stored twice across shards: {', '.join(sorted(duplicated)[:5])}")
        tensors.update(part)
    return tensors


def check_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], tied: bool) -> None:
    expected = model.checkpoint_shapes()
    if tied:
        expected.pop("lm_head.weight", None)  # shares the embedding; a stored copy is ignored
        tensors.pop("lm_head.weight", None)
    for name in [n for n in tensors if n.endswith(IGNORED_SUFFIXES)]:
        tensors.pop(name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s), "
                              f"e.g. {', '.join(unexpected[:5])}")
    wrong = [f"{n}: {tuple(tensors[n].shape)} != expected {tuple(s)}" for n, s in expected.items()
             if tensors[n].shape != s]
    if wrong:
        raise CheckpointError("tensor shape mismatch: " + "; ".join(wrong[:5]))


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
               ) -> torch.nn.Module:
    """Config + weights of `path` as a native model (the registry's class for its architecture) in eval
    mode on `device`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    try:
        config = ModelConfig.from_dir(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    torch_dtype = resolve_dtype(dtype)
    tensors = read_tensors(weight_files(path))
    cls = model_class(config.architecture)
    with torch.device("meta"):
        model = cls(config)
    check_tensors(model, tensors, config.tie_word_embeddings)
    model = cls(config).to(dtype=torch_dtype)  # real storage only once all checks passed
    model.load_checkpoint({n: t.to(torch_dtype) for n, t in tensors.items()})
    model = model.to(device).eval().requires_grad_(False)
    pack_linears(model)
    return model


def pack_linears(model: torch.nn.Module) -> None:
    """Each Linear's weight stored the way its products run fastest (layers.Linear.pack), except a weight
    an embedding shares (a tied output layer), which stays row-major for the lookups."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for m in model.modules():
        if isinstance(m, Linear) and id(m.weight) not in embedded:
            m.pack()
