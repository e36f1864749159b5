"""Routing policies: batched rules that decide, from the small model's outputs, where the large model writes.

A policy is named by a string a user types (`entropy:0.6`, `step-entropy:1.2`, `neural:router_models/demo`)
and parsed by `parse_policy`. Per engine step, `decide(inputs)` takes the small model's outputs for
every sequence using the policy and returns a bool mask: True = the large model emits this token.
Step-level policies also claim whole steps for the large model (`pre_route`), so the small model
does not even run for a sequence inside a large-owned step. Policies are stateless objects; what a
sequence needs to remember lives in its own `policy_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from collab_decode.engine.sequence import LARGE, Sequence


@dataclass
class RouterInputs:
    """The small model's view of each sequence's next position (row i = seqs[i])."""

    seqs: list[Sequence]
    logits: torch.Tensor  # (B, V) raw small-model logits
    hidden: torch.Tensor  # (B, hidden) small model's last-layer hidden state at that position
    proposed: torch.Tensor  # (B,) int64 token the small model sampled
    embed: Callable[[torch.Tensor], torch.Tensor]  # token ids (B,) -> small-model input embeddings (B, hidden)


class RoutingPolicy:
    name = "base"
    uses_large = True  # needs a large model
    uses_small = True  # runs the small model (every policy but `large`)
    lookahead = 0  # extra KV slots a request needs beyond max_tokens (speculative drafts)
    speculative = False

    def new_state(self, seed: int | None = None) -> Any:
        """Per-sequence state; `seed` is the request's sampling seed (None if unseeded)."""
        return None

    def pre_route(self, seq: Sequence) -> bool:
        """True if the large model writes this sequence's next token without asking the small model."""
        return False

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        """(B,) bool: route to the large model."""
        raise NotImplementedError

    def observe(self, seq: Sequence, text_delimiter_hit: bool) -> None:
        """Called after a token is committed; `text_delimiter_hit`: the output now ends a step."""


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) entropy in nats of softmax(logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class SmallOnly(RoutingPolicy):
    name, uses_large = "small", False

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return torch.zeros(len(inputs.seqs), dtype=torch.bool)


class LargeOnly(RoutingPolicy):
    """Every token from the large model (the small model still runs, like any policy's proposer)."""

    name = "large"
    uses_small = False

    def pre_route(self, seq: Sequence) -> bool:
        return True

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return torch.ones(len(inputs.seqs), dtype=torch.bool)


class RandomRoute(RoutingPolicy):
    """Route each token with probability p (a baseline at a given large share)."""

    name = "random"

    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random:p needs 0 <= p <= 1, got {p}")
        self.p = p

    def new_state(self, seed: int | None = None) -> Any:
        # seeded by the request's seed, so a seeded request routes reproducibly; unseeded ones share seed 0
        return {"rng": torch.Generator().manual_seed(0 if seed is None else seed)}

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        draws = [torch.rand((), generator=s.policy_state["rng"]).item() for s in inputs.seqs]
        return torch.tensor(draws) < self.p


class EntropyRoute(RoutingPolicy):
    """Route when the small model's next-token entropy (nats) exceeds t."""

    name = "entropy"

    def __init__(self, t: float):
        if t < 0:
            raise ValueError(f"entropy:t needs t >= 0 (nats), got {t}")
        self.t = t

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return entropy(inputs.logits) > self.t


class ConfidenceRoute(RoutingPolicy):
    """Route when the small model's top-1 probability is below t."""

    name = "confidence"

    def __init__(self, t: float):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"confidence:t needs 0 <= t <= 1, got {t}")
        self.t = t

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return torch.softmax(inputs.logits.float(), dim=-1).amax(-1) < self.t


class StepEntropyRoute(RoutingPolicy):
    """GlimpRouter: at the start of each step, the small model's first-token entropy decides who
    writes the whole step (the large model if entropy > t). Steps end at the engine's delimiter."""

    name = "step-entropy"

    def __init__(self, t: float):
        if t < 0:
            raise ValueError(f"step-entropy:t needs t >= 0 (nats), got {t}")
        self.t = t

    def new_state(self, seed: int | None = None) -> Any:
        return {"at_step_start": True, "owner": None}

    def pre_route(self, seq: Sequence) -> bool:
        state = seq.policy_state
        return not state["at_step_start"] and state["owner"] == LARGE

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        glimpse = entropy(inputs.logits) > self.t
        mask = torch.zeros(len(inputs.seqs), dtype=torch.bool)
        for i, seq in enumerate(inputs.seqs):
            state = seq.policy_state
            if state["at_step_start"]:
                state["owner"] = LARGE if bool(glimpse[i]) else "small"
                mask[i] = bool(glimpse[i])
        return mask

    def observe(self, seq: Sequence, text_delimiter_hit: bool) -> None:
        seq.policy_state["at_step_start"] = text_delimiter_hit


class Speculative(RoutingPolicy):
    """Lossless baseline: the small model drafts k tokens, the large model verifies them in one pass."""

    name = "speculative"
    speculative = True

    def __init__(self, k: int):
        if not 1 <= k <= 16:
            raise ValueError(f"speculative:k needs 1 <= k <= 16, got {k}")
        self.k = k
        self.lookahead = k + 1

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        raise RuntimeError("speculative sequences take the draft/verify path, not decide()")
