"""Routing: specs users type (`entropy:0.6`), parsed once, and the routers that decide per position.

    parse_routing("entropy:0.6") -> RoutingSpec -> build_router(spec, context) -> Router.decide(inputs)

Nothing here imports the engine: the engine sits above routing and hands routers plain tensors.
"""

from collab_decode.routing.policies import Router, RouterContext, RouterInputs, entropy
from collab_decode.routing.registry import POLICIES, router_class
from collab_decode.routing.spec import RoutingSpec, parse_routing

POLICY_NAMES = tuple(POLICIES)


def build_router(spec: RoutingSpec, context: RouterContext | None = None) -> Router | None:
    """The router of a spec (None for speculative decoding, which has none)."""
    cls = router_class(spec.policy)
    return None if cls is None else cls.from_spec(spec, context or RouterContext())


__all__ = ["POLICIES", "POLICY_NAMES", "Router", "RouterContext", "RouterInputs", "RoutingSpec", "build_router",
           "entropy", "parse_routing"]
