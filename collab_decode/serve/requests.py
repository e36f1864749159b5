"""What REST and gRPC requests share: prompts to token ids, the routing extension to a policy string,
the model-name check. Everything here raises InvalidRequest (a ValueError) for the client's mistakes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

CHAT_ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"developer": "system"}  # what newer OpenAI clients send instead of "system"
_ROUTING_KEYS = ("policy", "threshold", "k", "path")


class InvalidRequest(ValueError):
    """A client error; `param` names the offending request field, `code` is a machine-readable kind."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ServedModel:
    """What the server serves, as requests and /v1/models name it."""

    name: str  # the model name requests use
    small_dir: str
    large_dir: str | None
    routers: tuple[str, ...] = ()  # neural router checkpoints requests may use; the first is the default

    def check_name(self, requested: str | None) -> None:
        if requested and requested != self.name:
            raise InvalidRequest(f"model {requested!r} does not exist; this server serves {self.name!r}",
                                 param="model", code="model_not_found")


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """Raw text -> token ids with the tokenizer's special tokens (e.g. BOS), as vLLM and Engine.generate do."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """[{"role", "content"}] -> token ids of the chat template, ending in the assistant's turn."""
    if not messages:
        raise InvalidRequest("messages must hold at least one message", param="messages")
    rendered = []
    for i, message in enumerate(messages):
        role = _ROLE_ALIASES.get(message["role"], message["role"])
        if role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                                 param=f"messages.{i}.role")
        rendered.append({"role": role, "content": message["content"]})
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequest("this model's tokenizer has no chat template: use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may refuse a conversation (e.g. roles out of order)
        raise InvalidRequest(f"the chat template refused these messages: {e}", param="messages") from None
    return text_prompt_ids(tokenizer, text)


def routing_spec(routing: str | dict | None, model: ServedModel) -> str | None:
    """The routing extension -> a policy string the engine parses (None: the server's default).

    Takes the engine's own string ("entropy:0.6") or an object {"policy": "entropy", "threshold": 0.6};
    for speculative the number is k ({"policy": "speculative", "k": 4}); for neural, "path" may name
    one of the server's routers (default: the first). Range checks are the policy's own (engine side).
    """
    if routing is None:
        return None
    spec = routing if isinstance(routing, str) else _spec_from_object(routing, model)
    name, _, arg = spec.partition(":")
    if name == "neural":
        return _check_router(spec, model)
    if arg and not _finite(arg):
        raise InvalidRequest(f"routing threshold must be a finite number, got {arg!r}", param="routing")
    return spec


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return True  # not a number at all: the policy parser names the problem


def _spec_from_object(routing: dict, model: ServedModel) -> str:
    unknown = sorted(set(routing) - set(_ROUTING_KEYS))
    if unknown:
        raise InvalidRequest(f"unknown routing field(s) {unknown}; known: {', '.join(_ROUTING_KEYS)}",
                             param="routing")
    policy = routing.get("policy")
    if not isinstance(policy, str) or not policy:
        raise InvalidRequest(f"routing.policy must be a policy name, got {policy!r}", param="routing.policy")
    number = routing.get("k") if routing.get("k") is not None else routing.get("threshold")
    if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))
                               or not math.isfinite(number)):
        raise InvalidRequest(f"routing threshold must be a finite number, got {number!r}", param="routing.threshold")
    if policy == "neural":
        path = routing.get("path") or _default_router(model)
        return f"neural:{path}" + ("" if number is None else f":{float(number)!r}")
    if routing.get("path") is not None:
        raise InvalidRequest(f"routing.path applies to the neural policy only, not {policy!r}", param="routing.path")
    if number is None:
        return policy  # the policy says whether it needs a number
    if policy == "speculative":
        if number != int(number):
            raise InvalidRequest(f"speculative k must be an integer, got {number!r}", param="routing.k")
        return f"speculative:{int(number)}"
    return f"{policy}:{float(number)!r}"


def _default_router(model: ServedModel) -> str:
    if not model.routers:
        raise InvalidRequest("this server has no neural router; start it with --router PATH", param="routing")
    return model.routers[0]


def neural_router_path(spec: str) -> tuple[str, float | None]:
    """"neural:PATH[:t]" -> (PATH, t), split the way the engine's policy parser splits it."""
    arg = spec.partition(":")[2]
    head, _, tail = arg.rpartition(":")
    if head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return arg, None


def _check_router(spec: str, model: ServedModel) -> str:
    """Clients may only name routers the server was started with (no reading arbitrary server paths)."""
    path, threshold = neural_router_path(spec)
    if not path:
        path = _default_router(model)
    allowed = {str(Path(r).resolve()): r for r in model.routers}
    if str(Path(path).resolve()) not in allowed:
        raise InvalidRequest(f"router {path!r} is not served here; routers: {list(model.routers) or 'none'}",
                             param="routing")
    if threshold is not None and not math.isfinite(threshold):
        raise InvalidRequest(f"routing threshold must be a finite number, got {threshold!r}", param="routing")
    return f"neural:{path}" + ("" if threshold is None else f":{threshold!r}")
