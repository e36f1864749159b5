"""Build an engine from model directories (or the shipped demo pair): backends, tokenizer, pair check."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from collab_decode.backends.remote import RemoteConfig
from collab_decode.engine.config import EngineConfig
from collab_decode.engine.engine import Engine
from collab_decode.pairs import pair_dir

BACKENDS = ("native", "transformers")


def load_backend(path: str | Path, backend: str = "native", dtype: str = "float32", device: str = "cpu",
                 compile: bool = False):
    """A backend for the model in `path`: `native` (our Llama family) or `transformers` (any causal LM).
    `compile` (native only) runs decode steps through torch.compile."""
    if backend == "native":
        from collab_decode.backends.native import NativeBackend

        return NativeBackend.from_pretrained(path, dtype, device, compile)
    if backend == "transformers":
        from collab_decode.backends.hf import TransformersBackend

        return TransformersBackend.from_pretrained(path, dtype, device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"model directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from None


def check_same_tokenizer(small_tok, large_tok, small_path, large_path) -> None:
    """A pair must map the same strings to the same ids (embedding rows may differ by padding)."""
    small_vocab, large_vocab = small_tok.get_vocab(), large_tok.get_vocab()
    if small_vocab != large_vocab:
        only_small = sorted(set(small_vocab.items()) - set(large_vocab.items()))[:3]
        raise ValueError(f"{small_path} and {large_path} do not share a tokenizer "
                         f"({len(small_vocab)} vs {len(large_vocab)} entries; e.g. {only_small} differ): "
                         "a pair must use the same token ids")


def resolve_pair(pair: str | None, small: str | None, large: str | None) -> tuple[str | None, str | None]:
    """--pair NAME, or explicit --small/--large directories."""
    if pair is not None:
        return str(pair_dir(pair, "small")), str(pair_dir(pair, "large"))
    return small, large


def build_engine(small: str | Path, large: str | Path | None = None, backend: str = "native", dtype: str = "float32",
                 device: str = "cpu", config: EngineConfig | None = None, compile: bool = False,
                 routers: Mapping[str, str | Path] | None = None, remote: RemoteConfig | None = None) -> Engine:
    """Check the pair's tokenizers before any weights load, then load both backends (and the named neural
    router checkpoints requests may use). With `remote`, the large model is its endpoint (`large`, if given,
    is read for its tokenizer only)."""
    tokenizer = load_tokenizer(small)
    if large is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(large), small, large)
    small_backend = load_backend(small, backend, dtype, device, compile)
    if remote is not None:
        from collab_decode.backends.remote import RemoteBackend

        large_backend = RemoteBackend.connect(remote, min(small_backend.vocab_size, len(tokenizer)), tokenizer)
    else:
        large_backend = load_backend(large, backend, dtype, device, compile) if large is not None else None
    return Engine(small_backend, tokenizer, config, large_backend, routers, fingerprint_of(small, tokenizer))


def fingerprint_of(small: str | Path, tokenizer) -> str:
    """The pair fingerprint routers and label datasets record: the tokenizer's vocabulary + the small config."""
    import json

    from collab_decode.pairs import pair_fingerprint

    return pair_fingerprint(tokenizer.get_vocab(), json.loads((Path(small) / "config.json").read_text()))
