"""The routing policies users can name, and what each one is: its decode mode, its argument, its router.

Adding a policy is one file with its Router class plus one line here.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyInfo:
    mode: str  # token: the router decides every token; step: it decides at each step's start, and the
    #   chosen model writes the whole step; speculative: draft and verify (no router)
    argument: str | None  # what the number after ':' is: "threshold", "k", or None (no argument)
    bounds: tuple[float, float] | None  # inclusive range of a threshold
    router: str | None  # "module:Class" of the router (None for speculative)
    example: str  # shown in errors


_RULES = "collab_decode.routing.policies"
POLICIES: dict[str, PolicyInfo] = {
    "small": PolicyInfo("token", None, None, f"{_RULES}:SmallOnly", "small"),
    "large": PolicyInfo("token", None, None, f"{_RULES}:LargeOnly", "large"),
    "random": PolicyInfo("token", "threshold", (0.0, 1.0), f"{_RULES}:RandomRoute", "random:0.1"),
    "entropy": PolicyInfo("token", "threshold", (0.0, math.inf), f"{_RULES}:EntropyRoute", "entropy:0.6"),
    "confidence": PolicyInfo("token", "threshold", (0.0, 1.0), f"{_RULES}:ConfidenceRoute", "confidence:0.5"),
    "step-entropy": PolicyInfo("step", "threshold", (0.0, math.inf), f"{_RULES}:EntropyRoute", "step-entropy:1.0"),
    "neural": PolicyInfo("token", "threshold", (0.0, 1.0), "collab_decode.routing.neural:NeuralRoute",
                         "neural:NAME:0.5"),
    "speculative": PolicyInfo("speculative", "k", None, None, "speculative:4"),
}


def router_class(policy: str) -> type | None:
    """The Router class of a policy (imported now), or None for modes without a router."""
    target = POLICIES[policy].router
    if target is None:
        return None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
