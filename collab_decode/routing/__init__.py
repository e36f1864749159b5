"""Routing policies, named by strings: small, large, random:p, entropy:t, confidence:t,
step-entropy:t, neural:PATH[:t], speculative:k."""

from __future__ import annotations

from collab_decode.routing.policies import (ConfidenceRoute, EntropyRoute, LargeOnly, RandomRoute, RouterInputs,
                                            RoutingPolicy, SmallOnly, Speculative, StepEntropyRoute, entropy)

POLICY_NAMES = ("small", "large", "random", "entropy", "confidence", "step-entropy", "neural", "speculative")
_FLOAT_POLICIES = {"random": RandomRoute, "entropy": EntropyRoute, "confidence": ConfidenceRoute,
                   "step-entropy": StepEntropyRoute}


def parse_policy(spec, engine=None) -> RoutingPolicy:
    """A policy from its string (`entropy:0.6`); a RoutingPolicy passes through. ValueError if malformed."""
    if isinstance(spec, RoutingPolicy):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"routing policy must be a non-empty string, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    if name in ("small", "large"):
        if arg:
            raise ValueError(f"policy {name!r} takes no argument, got {spec!r}")
        return SmallOnly() if name == "small" else LargeOnly()
    if name == "neural":
        return _neural(arg, engine)
    if not arg:
        raise ValueError(f"policy {name!r} needs an argument, e.g. {name}:{'4' if name == 'speculative' else '0.5'}")
    try:
        value = int(arg) if name == "speculative" else float(arg)
    except ValueError:
        raise ValueError(f"bad argument {arg!r} for policy {name!r}") from None
    return Speculative(value) if name == "speculative" else _FLOAT_POLICIES[name](value)


def _neural(arg: str, engine) -> RoutingPolicy:
    from collab_decode.routing.neural import NeuralRoute

    path, threshold = arg, None
    head, _, tail = arg.rpartition(":")
    if head:
        try:
            path, threshold = head, float(tail)
        except ValueError:
            path = arg
    if not path:
        raise ValueError("policy 'neural' needs a router path: neural:PATH[:threshold]")
    hidden = engine.backends["small"].config.hidden_size if engine is not None and hasattr(
        engine.backends["small"], "config") else None
    return NeuralRoute(path, threshold, hidden)
