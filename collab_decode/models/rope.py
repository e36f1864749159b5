"""Rotary position embedding with the scaling variants in use: default, linear, dynamic (NTK), llama3.

Layout is Hugging Face's (rotate-half, frequencies repeated over both halves of the head), so weights
trained there run unchanged. Static variants precompute a cos/sin table and index it by position;
`dynamic` derives the base from each sequence's current length, as transformers does for one sequence.
"""

from __future__ import annotations

import math

import torch

from collab_decode.models.config import ModelConfig


def inv_freq(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32; `seq_len` matters only for dynamic scaling."""
    rope, dim = config.rope, config.head_dim
    base = rope.theta
    if rope.type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = base * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.type == "linear":
        freqs = freqs / rope.factor
    elif rope.type == "llama3":
        freqs = _llama3_scale(freqs, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
                              rope.original_max_position_embeddings or config.max_position_embeddings)
    return freqs


def _llama3_scale(freqs: torch.Tensor, factor: float, low: float, high: float, old_len: int) -> torch.Tensor:
    # long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > old_len / low, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin for a ragged batch of positions; a precomputed table for the static variants."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype = config, device, dtype
        self.dynamic = config.rope.type == "dynamic"
        self.table = None  # static variants: (L, 1, 2D), cos then signed sin per position
        if not self.dynamic:
            self._build_table(config.max_position_embeddings)

    def _build_table(self, length: int) -> None:
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq(self.config))  # (L, D/2)
        # one table, so a forward looks its positions up with one index op (at batch 1 an op costs more
        # than its work), then takes cos and sin as views
        self.table = torch.cat(self._cos_sin(angles), dim=-1)

    def _cos_sin(self, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D/2) angles -> cos, signed sin (N, 1, D): the layout apply_rope takes."""
        emb = torch.cat([angles, angles], dim=-1)  # (N, D)
        half = angles.shape[-1]
        sin = emb.sin()
        sin[:, :half] = -sin[:, :half]  # rotate-half's sign, folded in once instead of at every layer
        return emb.cos()[:, None].to(self.device, self.dtype), sin[:, None].to(self.device, self.dtype)

    def cos_sin(self, positions: torch.Tensor, seq_lens: list[int],
                chunk_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (T, 1, D) for positions (T,) of chunks of chunk_lens tokens ending at seq_lens (per
        sequence: dynamic scaling depends on them, and the longest tells the table's reach without a device
        sync). The sin's first half is negated (see apply_rope)."""
        if not self.dynamic:
            last = max(seq_lens, default=0) - 1  # the furthest position in the batch
            if last >= self.table.shape[0]:
                self._build_table(2 * last + 1)  # beyond max_position_embeddings
            both = self.table[positions]  # (T, 1, 2D)
            dim = both.shape[-1] // 2
            return both[..., :dim], both[..., dim:]
        freqs = torch.cat([inv_freq(self.config, n).expand(c, -1) for n, c in zip(seq_lens, chunk_lens)])
        angles = positions.float().cpu()[:, None] * freqs  # (T, D/2)
        return self._cos_sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) rotated by cos and signed sin (T, 1, D) from RotaryEmbedding.cos_sin.

    Hugging Face's rotate-half, x * cos + cat(-x2, x1) * sin, with the sign folded into sin: then the
    halves swap with one roll (two ops fewer per layer, which a small model's decode step notices)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
