"""The transformers fallback: any causal LM that transformers can load, for architectures the native
backend does not implement. Correct, not fast: no paged cache, one forward per sequence.

Each sequence keeps its own transformers cache and the token ids that cache holds. A chunk whose
`num_cached` is below that length is a rollback (speculative rejection, preemption): the cache is
cropped back, or, where a crop cannot restore it exactly (sliding-window or recurrent layers),
rebuilt by replaying the kept ids in front of the chunk. transformers is imported in this module only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from collab_decode.backends.base import ModelInput, ModelOutput, SeqChunk
from collab_decode.models.loader import resolve_dtype


@dataclass
class SeqCache:
    """What the backend holds for one sequence."""

    cache: Any = None  # the transformers Cache with token_ids' K/V (None before the first forward)
    token_ids: list[int] = field(default_factory=list)  # the tokens that cache holds, in order


class TransformersBackend:
    """A transformers `*ForCausalLM` behind the backend protocol (kv_bytes_per_token() == 0)."""

    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config.get_text_config()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = self.config.vocab_size
        self.hidden_size = self.config.hidden_size
        # models with relative positions (no fixed table) have no limit of their own
        self.max_model_len = getattr(self.config, "max_position_embeddings", None) or 1 << 30
        self.eos_token_ids = _eos_ids(model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.caches: dict[int, SeqCache] = {}  # seq_id -> its cache

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu") -> "TransformersBackend":
        """Load a checkpoint directory (config.json + safetensors weights); ValueError if it cannot be."""
        path = Path(path)
        torch_dtype = resolve_dtype(dtype)
        if not path.is_dir():
            raise ValueError(f"{path} is not a model directory")
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True,
                                                         use_safetensors=True)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... by cause
            raise ValueError(f"cannot load {path} as a transformers causal LM: {type(e).__name__}: {e}") from None
        return cls(model.to(device))

    def kv_bytes_per_token(self) -> int:
        return 0  # no paged cache: the engine's block bookkeeping is nominal for this backend

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        pass  # caches grow per sequence in forward()

    def release(self, seq_id: int) -> None:
        self.caches.pop(seq_id, None)

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    @torch.inference_mode()
    def forward(self, batch: ModelInput) -> ModelOutput:
        rows = [self._run(chunk) for chunk in batch.chunks]  # (logits (n, V), hidden (n, H)) per chunk
        out = ModelOutput(logits=torch.stack([logits[-1] for logits, _ in rows]),
                          hidden=torch.stack([hidden[-1] for _, hidden in rows]))
        for chunk, (logits, hidden) in zip(batch.chunks, rows):
            if chunk.all_positions:
                out.all_logits[chunk.seq_id], out.all_hidden[chunk.seq_id] = logits, hidden
        return out

    def _run(self, chunk: SeqChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's forward: float32 logits (n, V) and hidden (n, H), n = 1 or len(chunk) if all_positions."""
        if not chunk.token_ids:
            raise ValueError(f"sequence {chunk.seq_id}: a forward chunk needs at least one new token")
        seq, replay = self._rolled_back(chunk)
        ids = replay + list(chunk.token_ids)
        keep = len(chunk.token_ids) if chunk.all_positions else 1
        kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
        result = self.model(input_ids=torch.tensor([ids], dtype=torch.int64, device=self.device),
                            past_key_values=seq.cache, use_cache=True, output_hidden_states=True, **kwargs)
        seq.cache = result.past_key_values
        seq.token_ids.extend(ids)
        # hidden_states[-1] is the last layer's output after the final norm; (1, T, H)
        return result.logits[0, -keep:].float(), result.hidden_states[-1][0, -keep:]

    def _rolled_back(self, chunk: SeqChunk) -> tuple[SeqCache, list[int]]:
        """The sequence's cache cut back to chunk.num_cached tokens, and any ids to replay before the chunk."""
        seq = self.caches.setdefault(chunk.seq_id, SeqCache())
        num_held, num_cached = len(seq.token_ids), chunk.num_cached
        if num_cached > num_held:
            raise ValueError(f"sequence {chunk.seq_id}: the chunk says {num_cached} tokens are cached, but this "
                             f"backend holds {num_held}; it was never sent the tokens in between")
        if num_cached == num_held:
            return seq, []
        if num_cached > 0 and _exactly_croppable(seq.cache):
            seq.cache.crop(num_cached - num_held)  # a negative count removes that many (transformers 4.56 and 5)
            del seq.token_ids[num_cached:]
            return seq, []
        replay = seq.token_ids[:num_cached]
        seq = self.caches[chunk.seq_id] = SeqCache()
        return seq, replay


def _exactly_croppable(cache) -> bool:
    """Whether crop() restores the cache exactly: full-attention K/V only, no sliding window or recurrent state."""
    from transformers import DynamicCache

    return (isinstance(cache, DynamicCache) and getattr(cache, "is_croppable", True)
            and not any(getattr(cache, "is_sliding", [])))


def _eos_ids(model) -> tuple[int, ...]:
    """The model's EOS ids: config.eos_token_id (an int, a list or None), else the generation config's."""
    eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None and getattr(model, "generation_config", None) is not None:
        eos = model.generation_config.eos_token_id
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(int(t) for t in eos)
