"""The narrow protocol between the engine and a model: a ragged batch in, logits and hidden states out.

The engine (CPU-side bookkeeping) sends a `ModelInput`: for each scheduled sequence, the chunk of
tokens its cache lacks (`tokens[num_cached:]`), how many it already holds, and its block table.
A backend owns the weights, device tensors and K/V storage, runs the chunks in one forward and
returns a `ModelOutput` with the logits and last-layer hidden state at each sequence's last position
(and at every position for sequences that ask, for the labeling pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(slots=True)  # (made once per sequence per step)
class SeqChunk:
    """One sequence's part of a forward."""

    seq_id: int
    token_ids: list[int]  # the new tokens: tokens[num_cached:num_cached + len(token_ids)]
    num_cached: int  # tokens of this sequence the cache already holds
    block_table: list[int]  # physical blocks covering at least num_cached + len(token_ids) tokens
    all_positions: bool = False  # also return logits/hidden at every new position


@dataclass
class ModelInput:
    """A ragged batch: every chunk runs in the same forward."""

    chunks: list[SeqChunk]


@dataclass
class ModelOutput:
    """Results at each chunk's last position (row i = chunks[i])."""

    logits: torch.Tensor  # (B, V) float32
    hidden: torch.Tensor  # (B, hidden) last layer, after the final norm
    all_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> (len(chunk), V), if asked
    all_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> (len(chunk), hidden)


class Backend(Protocol):
    """What the engine needs from a model: the engine reads these attributes and calls these methods,
    nothing else. A backend with a paged cache also has `clear_blocks(block_ids)`: zero those blocks (the
    engine calls it for a failed request's blocks, which may hold NaN, before the pool hands them out)."""

    vocab_size: int  # rows of the logits (may exceed the tokenizer's by padding)
    hidden_size: int  # width of the hidden states it returns (router features)
    max_model_len: int  # most tokens of one sequence the model was built for
    device: torch.device  # where its tensors live (a request's generator is made there)
    eos_token_ids: tuple[int, ...]

    def kv_bytes_per_token(self) -> int:
        """Bytes of K/V cache one token costs (all layers); 0 if the backend keeps no paged cache."""
        ...

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate the K/V storage for `num_blocks` blocks of `block_size` tokens."""
        ...

    def forward(self, batch: ModelInput) -> ModelOutput:
        """Run every chunk of the batch, writing their K/V; return logits and hidden states."""
        ...

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, hidden) of token ids (B,), for router features."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget anything held for a finished sequence (paged backends hold nothing per sequence)."""
        ...


class BackendError(RuntimeError):
    """A backend could not run some sequences of a batch (e.g. its remote endpoint is down).

    `errors` maps each failed sequence to its message. The engine ends those requests with the message
    (finish reason "error") and goes on; the other sequences of the batch commit nothing this step and
    run again in the next one.
    """

    def __init__(self, errors: dict[int, str]):
        super().__init__(next(iter(errors.values()), "backend error"))
        self.errors = errors


def unavailable_reason(backend) -> str | None:
    """Why a backend cannot serve now (remote backends: their endpoint is down), or None when it can.
    Local backends are always available; a backend reports by defining `unavailable() -> str | None`."""
    unavailable = getattr(backend, "unavailable", None)
    return unavailable() if unavailable is not None else None
