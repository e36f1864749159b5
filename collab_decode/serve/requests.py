"""What REST and gRPC requests share: prompts to token ids, the routing extension to a policy string,
the model-name check. Everything here raises InvalidRequest (a ValueError) for the client's mistakes."""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass
from pathlib import PurePath

from collab_decode.routing import RoutingSpec, parse_routing
from collab_decode.sampling import SamplingParams

CHAT_ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"developer": "system"}  # what newer OpenAI clients send instead of "system"


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
    routers: tuple[str, ...] = ()  # names of the neural routers requests may use; the first is the default

    @property
    def small_name(self) -> str:
        """The small model as responses name it: its directory's name, never its path."""
        return _public_name(self.small_dir)

    @property
    def large_name(self) -> str | None:
        return None if self.large_dir is None else _public_name(self.large_dir)

    def check_name(self, requested: str | None) -> None:
        if requested and requested != self.name:
            raise InvalidRequest(f"model {requested!r} does not exist; this server serves {self.name!r}",
                                 param="model", code="model_not_found")


def bearer_key_matches(authorization: str, api_key: str) -> bool:
    """An `Authorization` header (gRPC: metadata) against the server's key: only `Bearer KEY` is accepted
    (a bare key is not), compared in constant time."""
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def _public_name(location: str) -> str:
    """A checkpoint directory -> its last component; a remote endpoint's URL -> "remote" (no host, no key)."""
    if "://" in location:
        return "remote"
    return PurePath(location).name or "model"


MAX_N = 128  # most choices per prompt


def choice_samplings(sampling: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice of a prompt (`n` of them): with a seed, choice i samples with seed + i
    (vLLM's rule), so seeded choices differ and each one reproduces alone."""
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"n must be in [1, {MAX_N}], got {n}", param="n")
    if sampling.seed is None:
        return [sampling] * n
    if sampling.seed + n - 1 >= 2**64:
        raise InvalidRequest(f"seed + n - 1 must be < 2**64 (choice i samples with seed + i), got seed "
                             f"{sampling.seed} and n {n}", param="seed")
    return [dataclasses.replace(sampling, seed=sampling.seed + i) for i in range(n)]


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """Raw text -> token ids with the tokenizer's special tokens (e.g. BOS), as vLLM and Engine.generate do."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """[{"role", "content"}] -> token ids of the chat template, ending in the assistant's turn.

    The rendered template already holds whatever special tokens it wants (often a BOS): it is tokenized
    without adding the tokenizer's own, as vLLM and Hugging Face's apply_chat_template(tokenize=True) do.
    """
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
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def routing_spec(routing: str | dict | None) -> RoutingSpec | None:
    """The routing extension ("entropy:0.6" or {"policy": "entropy", "threshold": 0.6}) -> a RoutingSpec,
    parsed by the one parser the CLI and the engine use (None: the server's default). Neural routers are
    named ({"policy": "neural", "router": "demo"}); whether the name is loaded is the engine's check."""
    if routing is None:
        return None
    try:
        return parse_routing(routing)
    except ValueError as e:
        raise InvalidRequest(str(e), param="routing") from None
