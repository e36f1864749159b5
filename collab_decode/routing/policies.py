"""Routers: batched rules that decide, from the small model's outputs, where the large model writes.

Per engine step, `decide(inputs)` takes the small model's view of every sequence that needs a decision
from this router (one call per distinct router per step) and returns a bool mask: True = the large
model writes this token. Routers are shared by every sequence whose spec names them, so they keep no
per-sequence data themselves: what a sequence needs (a seeded generator, say) is its `state`, made by
`new_state` and handed back in `inputs.states`. How decisions become tokens (per token, per step, or
drafts verified speculatively) is the engine's business, not the router's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from collab_decode.sampling import _hostops, host_readable


@dataclass
class RouterInputs:
    """The small model's view of each sequence's next position (row i = one sequence)."""

    states: list[Any]  # each row's router state (Router.new_state)
    logits: torch.Tensor  # (B, V) raw small-model logits
    hidden: torch.Tensor  # (B, hidden) small model's last-layer hidden state at that position
    # (B,) int64 token the small model sampled; None: made from proposed_ids when read (`proposed`): most routers
    # never read it, and at batch 1 making a tensor costs more than the list it comes from
    proposed_tensor: torch.Tensor | None
    embed: Callable[[torch.Tensor], torch.Tensor]  # token ids (B,) -> small-model input embeddings (B, hidden)
    row_max: torch.Tensor | None = None  # (B,) each row's largest logit (the sampler's), None: not known
    # each row's sequence, read-only: its prompt_ids and token_ids so far (a router that looks the prompt up)
    contexts: list[Any] | None = None
    # each row's top-1 probability, top1_prob(logits) on the host, when the sampler computed it (Router.reads_top1)
    top1: list[float] | None = None
    # `proposed` as Python ints (None: read from proposed_tensor where needed), and the (V, hidden) table `embed`
    # looks rows up in, where the small model's backend has one (None: a router computing on the host cannot)
    proposed_ids: list[int] | None = None
    embedding: torch.Tensor | None = None

    @property
    def proposed(self) -> torch.Tensor:
        """(B,) int64 token the small model sampled."""
        if self.proposed_tensor is None:
            self.proposed_tensor = torch.tensor(self.proposed_ids, device=self.logits.device)
        return self.proposed_tensor

    def select(self, rows: list[int]) -> "RouterInputs":
        """These rows only, in this order."""
        idx = torch.tensor(rows)
        return RouterInputs([self.states[i] for i in rows], self.logits[idx], self.hidden[idx], self.proposed[idx],
                            self.embed, None if self.row_max is None else self.row_max[idx],
                            None if self.contexts is None else [self.contexts[i] for i in rows],
                            None if self.top1 is None else [self.top1[i] for i in rows],
                            None if self.proposed_ids is None else [self.proposed_ids[i] for i in rows],
                            self.embedding)

    def top1_probs(self) -> list[float]:
        """Each row's top-1 probability on the host: the sampler's where it computed it, else computed now."""
        return self.top1 if self.top1 is not None else top1_prob(self.logits).tolist()


@dataclass(frozen=True)
class RouterContext:
    """What building a router may need from the engine that will run it."""

    hidden_size: int = 0  # the small model's hidden size
    routers: Mapping[str, Any] = field(default_factory=dict)  # neural routers loaded at start, by name
    vocab_size: int = 0  # the columns of the logits a router decides from (0: not known)


class Router:
    uses_large = True  # needs a large model
    routes_all = False  # the large model writes every token and the small model never runs
    # decide reads inputs.top1 where present: a greedy batch's sampler then computes it with the tokens
    reads_top1 = False
    # a top-1 probability from which this router routes no position (a router that reads_top1): where every
    # row of a token step reaches it, the engine takes the small model's tokens without asking (None: no such)
    gate: float | None = None

    @classmethod
    def from_spec(cls, spec, context: RouterContext) -> "Router":
        """The router for a RoutingSpec (its threshold is already range-checked)."""
        return cls(spec.threshold) if spec.threshold is not None else cls()

    def new_state(self, seed: int | None = None) -> Any:
        """Per-sequence state; `seed` is the request's sampling seed (None if unseeded)."""
        return None

    def decide(self, inputs: RouterInputs) -> torch.Tensor | list[bool]:
        """(B,) bool tensor, or a list of B bools: the large model writes this token."""
        raise NotImplementedError

    def observe(self, state: Any, routed: bool) -> None:
        """Called after each token a sequence commits (`routed`: the large model wrote it)."""


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) entropy in nats of softmax(logits). A -inf logit (probability 0) adds 0: its log
    probability is clamped to the float32 minimum first, where 0 * -inf would make the row's entropy NaN."""
    logp = torch.log_softmax(logits.float(), dim=-1).clamp_min_(torch.finfo(torch.float32).min)
    return -torch.linalg.vecdot(logp.exp(), logp)  # one op for the sum of products (at batch 1 ops cost most)


# Up to this many rows on the CPU the entropy routers take each row's entropy from one call of _hostops.entropy
# (collab_decode/_hostops.c: a C loop a row) instead of three torch ops (measured: tools/host_ops.py)
HOST_ENTROPY_MAX_ROWS = 32


def row_entropies(logits: torch.Tensor) -> list[float]:
    """(B, V) logits -> each row's entropy in nats on the host: computed there for a few float32 rows on the CPU,
    else `entropy`'s torch ops and a host copy."""
    if logits.shape[0] <= HOST_ENTROPY_MAX_ROWS and host_readable(logits):
        return _hostops.entropy(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0))
    return entropy(logits).tolist()


# how far below t the entropy gate's bound must stay: the routers' entropy is float32 arithmetic (C or torch,
# ~1e-6 of a nat on these rows), the sampler's top-1 probability too (the bound moves ~10x its error there)
ENTROPY_GATE_MARGIN = 1e-3


def max_entropy(p1: float, vocab_size: int) -> float:
    """The largest entropy (nats) a distribution over `vocab_size` tokens can have when its most probable one has
    probability p1 >= 1 / vocab_size: the rest spread evenly over the others."""
    rest = 1.0 - p1
    h = -p1 * math.log(p1)
    return h if rest <= 0 else h - rest * math.log(rest / (vocab_size - 1))


def entropy_gate(t: float, vocab_size: int) -> float | None:
    """The smallest top-1 probability (to ~1e-12) from which every row's entropy is below t by at least
    ENTROPY_GATE_MARGIN (max_entropy falls as p1 rises from 1 / V to 1); None where the size is not known or t is
    within the margin of 0."""
    bound = t - ENTROPY_GATE_MARGIN
    if vocab_size < 2 or bound <= 0:
        return None
    low, high = 1.0 / vocab_size, 1.0  # max_entropy(low) = log V, max_entropy(high) = 0 <= bound
    if max_entropy(low, vocab_size) <= bound:
        return 0.0  # no row of this vocabulary can exceed t
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if max_entropy(mid, vocab_size) <= bound else (mid, high)
    return high


def top1_prob(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) probability of the most likely token (softmax + max: at batch 1 a third of
    exp(max - logsumexp)'s time, measured)."""
    return torch.softmax(logits.float(), -1).amax(-1)


class SmallOnly(Router):
    uses_large = False

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return torch.zeros(len(inputs.states), dtype=torch.bool)


class LargeOnly(Router):
    """Every token from the large model; the small model does not run."""

    routes_all = True

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return torch.ones(len(inputs.states), dtype=torch.bool)


class RandomRoute(Router):
    """Route each token with probability p (a baseline at a given large share)."""

    def __init__(self, p: float):
        self.p = p

    def new_state(self, seed: int | None = None) -> Any:
        # seeded by the request's seed, so a seeded request routes reproducibly; unseeded ones share seed 0
        return torch.Generator().manual_seed(0 if seed is None else seed)

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        draws = [torch.rand((), generator=rng).item() for rng in inputs.states]
        return torch.tensor(draws) < self.p


class EntropyRoute(Router):
    """Route when the small model's next-token entropy (nats) exceeds t. In step mode (step-entropy,
    GlimpRouter) the engine asks only at the start of each step, and the answer owns the step.

    Its gate (in token mode, where the vocabulary's size is known): a row whose top-1 probability reaches it has
    an entropy below t whatever the rest of the row (`entropy_gate`), so the engine takes the small model's token
    without asking, as for a confidence router's sure rows. A step router has none (the engine reads no gate
    there), so the sampler computes no top-1 probability for it."""

    def __init__(self, t: float, vocab_size: int = 0):
        self.t = t
        self.gate = entropy_gate(t, vocab_size)
        self.reads_top1 = self.gate is not None

    @classmethod
    def from_spec(cls, spec, context: RouterContext) -> "EntropyRoute":
        return cls(spec.threshold, context.vocab_size if spec.mode == "token" else 0)

    def decide(self, inputs: RouterInputs) -> list[bool]:
        return [h > self.t for h in row_entropies(inputs.logits)]


class ConfidenceRoute(Router):
    """Route when the small model's top-1 probability is below t."""

    reads_top1 = True

    def __init__(self, t: float):
        self.t = self.gate = t  # p >= t is never routed

    def decide(self, inputs: RouterInputs) -> list[bool]:
        return [p < self.t for p in inputs.top1_probs()]
