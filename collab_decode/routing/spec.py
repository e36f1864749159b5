"""A routing choice as users name it, parsed and checked in one place for the CLI, REST and gRPC.

    "entropy:0.6"                                  -> RoutingSpec("entropy", threshold=0.6)
    {"policy": "entropy", "threshold": 0.6}        -> the same
    "speculative:4" / {"policy": "speculative", "k": 4}
    "neural" / "neural:demo" / "neural:demo:0.4" / {"policy": "neural", "router": "demo", "threshold": 0.4}
    "neural:demo:share=0.03" / {"policy": "neural", "router": "demo", "large_share": 0.03}  (a budget: the
        threshold comes from the router's calibration table)

A spec is a value (frozen, hashable): the engine builds one router per distinct spec and shares it
between the sequences that name it. Neural routers are named, never given by path: the engine knows
the routers it was started with (`router=None` means its first).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from collab_decode.routing.registry import POLICIES

ROUTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_OBJECT_KEYS = ("policy", "threshold", "k", "router", "large_share")


@dataclass(frozen=True)
class RoutingSpec:
    policy: str  # a key of routing/registry.py's POLICIES
    threshold: float | None = None  # random: p; entropy, step-entropy: nats; confidence, neural: probability
    k: int | None = None  # speculative: drafts per verification
    router: str | None = None  # neural: the router's name (None: the engine's first router)
    large_share: float | None = None  # neural: a large-share budget instead of a threshold

    def __post_init__(self):
        info = POLICIES.get(self.policy)
        if info is None:
            raise ValueError(f"unknown routing policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.router is not None and (self.policy != "neural" or not ROUTER_NAME.match(self.router)):
            raise ValueError(f"router {self.router!r} is not a router name (letters, digits, _ . -) of a "
                             f"neural policy")
        if info.argument == "k":
            _check_k(self)
        elif self.k is not None:
            raise ValueError(f"policy {self.policy!r} takes no k")
        if self.large_share is not None:
            _check_share(self)
        if info.argument == "threshold":
            _check_threshold(self, info)
        elif self.threshold is not None:
            raise ValueError(f"policy {self.policy!r} takes no threshold")

    @property
    def mode(self) -> str:
        """token | step | speculative: how the engine decodes sequences of this spec."""
        return POLICIES[self.policy].mode

    def __str__(self) -> str:
        parts = [self.policy] + ([self.router] if self.router else [])
        if self.k is not None:
            parts.append(str(self.k))
        if self.large_share is not None:
            parts.append(f"share={self.large_share!r}")
        if self.threshold is not None:
            parts.append(f"{self.threshold:g}" if float(f"{self.threshold:g}") == self.threshold
                         else repr(self.threshold))
        return ":".join(parts)


def _check_k(spec: RoutingSpec) -> None:
    k = spec.k
    if k is None:
        raise ValueError(f"policy {spec.policy!r} needs k, e.g. {spec.policy}:4")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
        raise ValueError(f"speculative:k needs an integer 1 <= k <= 16, got {k!r}")


def _check_share(spec: RoutingSpec) -> None:
    s = spec.large_share
    if spec.policy != "neural":
        raise ValueError(f"a large-share budget needs a calibrated router (neural), not {spec.policy!r}")
    if spec.threshold is not None:
        raise ValueError("give a threshold or a large_share budget, not both")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 < s <= 1:
        raise ValueError(f"large_share must be a number in (0, 1], got {s!r}")


def _check_threshold(spec: RoutingSpec, info) -> None:
    t, (lo, hi) = spec.threshold, info.bounds
    if t is None:
        if spec.policy == "neural":
            return  # the router's calibrated threshold
        raise ValueError(f"policy {spec.policy!r} needs a threshold, e.g. {info.example}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not lo <= t <= hi:
        name = "p" if spec.policy == "random" else "t"
        bound = f"{name} >= {lo:g}" if hi == math.inf else f"{lo:g} <= {name} <= {hi:g}"
        raise ValueError(f"{spec.policy}:{name} needs a finite number {bound}, got {t!r}")


def parse_routing(value: str | dict[str, Any] | RoutingSpec) -> RoutingSpec:
    """A RoutingSpec from its string or JSON-object form; ValueError naming what is wrong."""
    if isinstance(value, RoutingSpec):
        return value
    if isinstance(value, dict):
        return _from_object(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"routing must be a non-empty string or an object, got {value!r}")
    name, _, arg = value.partition(":")
    info = POLICIES.get(name)
    if info is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}")
    if name == "neural":
        return _neural(arg)
    if info.argument is None:
        if arg:
            raise ValueError(f"policy {name!r} takes no argument, got {value!r}")
        return RoutingSpec(name)
    if not arg:
        raise ValueError(f"policy {name!r} needs an argument, e.g. {info.example}")
    if info.argument == "k":
        if not re.fullmatch(r"[0-9]+", arg):
            raise ValueError(f"bad argument {arg!r} for policy {name!r}: k is a whole number")
        return RoutingSpec(name, k=int(arg))
    return RoutingSpec(name, threshold=_number(arg, name))


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"bad argument {text!r} for policy {name!r}") from None


def _neural(arg: str) -> RoutingSpec:
    """neural[:NAME][:t | :share=S]: a lone argument that reads as a number is the threshold."""
    if not arg:
        return RoutingSpec("neural")
    head, sep, tail = arg.partition(":")
    if head.startswith("share="):
        head, sep, tail = "", ":", head
    if sep and tail.startswith("share="):
        return RoutingSpec("neural", large_share=_number(tail[len("share="):], "neural"), router=head or None)
    if sep:
        return RoutingSpec("neural", threshold=_number(tail, "neural"), router=head or None)
    try:
        return RoutingSpec("neural", threshold=float(head))
    except ValueError:
        return RoutingSpec("neural", router=head)


def _from_object(obj: dict[str, Any]) -> RoutingSpec:
    unknown = sorted(set(obj) - set(_OBJECT_KEYS))
    if unknown:
        hint = " (routers are named: use \"router\")" if "path" in unknown else ""
        raise ValueError(f"unknown routing field(s) {unknown}; known: {', '.join(_OBJECT_KEYS)}{hint}")
    policy = obj.get("policy")
    if not isinstance(policy, str) or not policy:
        raise ValueError(f"routing.policy must be a policy name, got {policy!r}")
    router = obj.get("router")
    if router is not None and not isinstance(router, str):
        raise ValueError(f"routing.router must be a router name, got {router!r}")
    k = obj.get("k")
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    return RoutingSpec(policy, threshold=obj.get("threshold"), k=k, router=router, large_share=obj.get("large_share"))
