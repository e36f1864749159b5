"""A request in flight: its tokens, what each model's cache holds of them, and who wrote each token.

`num_cached[model]` counts the leading tokens whose K/V that model's cache holds. A model that is
asked for the next token runs `token_ids[num_cached[model]:]` and catches up to `len(token_ids)`:
prompt prefill, the large model's lazy catch-up and speculative rollback are all this one rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from collab_decode.routing import Router, RoutingSpec
from collab_decode.sampling import SamplingParams

SMALL, LARGE = "small", "large"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SequenceStats:
    """Per-request routing counters."""

    num_small_tokens: int = 0  # output tokens the small model emitted
    num_large_tokens: int = 0  # output tokens the large model emitted
    num_large_calls: int = 0  # large-model forwards this sequence took part in
    num_catchup_tokens: int = 0  # tokens the large model processed to catch up (excluding its first prefill)
    num_preemptions: int = 0
    num_large_waits: int = 0  # steps its routed tokens waited to share a large-model call (large_wait_steps)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache of the model that first reads the prompt

    @property
    def large_share(self) -> float:
        total = self.num_small_tokens + self.num_large_tokens
        return self.num_large_tokens / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"small_tokens": self.num_small_tokens, "large_tokens": self.num_large_tokens,
                "large_calls": self.num_large_calls, "catchup_tokens": self.num_catchup_tokens,
                "preemptions": self.num_preemptions, "large_waits": self.num_large_waits,
                "cached_tokens": self.num_cached_tokens,
                "large_share": self.large_share}


@dataclass(eq=False)  # a request is itself: `in` and `remove` on the scheduler's lists compare identity
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    arrival: int  # admission order key: the youngest sequence is preempted first
    spec: RoutingSpec = RoutingSpec("small")  # how the request asked to be routed; its mode is the decode mode
    router: Router | None = None  # decides this sequence's tokens (shared by sequences with the same spec)
    router_state: Any = None  # what the router keeps for this sequence (Router.new_state)
    step_owner: str | None = None  # step mode: SMALL or LARGE writes the current step; None at a step start
    waiting_since: int | None = None  # the engine step from which its routed token waits for a large call
    queue_time_s: float | None = None  # seconds from add_request to its first admission (None: not admitted yet)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_cached: dict[str, int] = field(default_factory=lambda: {SMALL: 0, LARGE: 0})
    provenance: list[str] = field(default_factory=list)  # SMALL or LARGE per output token
    logprobs: list[float] = field(default_factory=list)  # chosen-token logprob per output token, if asked
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # if asked: per prompt token, None for the first, then (its logprob, its rank, [(id, logprob)] top-n)
    # under the prompt_scorer model
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]] | None] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why the request failed (finish reason "error"), e.g. the large model's endpoint is down
    error_code: str | None = None  # its kind (engine/output.py: MODEL_ERROR, INTERNAL_ERROR, UPSTREAM_ERROR)
    output_text: str = ""  # detokenized output emitted so far, truncated at a stop string
    decoded_text: str = ""  # everything detokenized so far (may run ahead of output_text)
    detok_offsets: tuple[int, int] = (0, 0)  # output tokens [prefix, read): the incremental decode window
    # detokenize at every step (an in-process stream reads each output's text); False: only when a stop string
    # or a step's end needs the text, at the end, and when the caller asks (OutputProcessor.flush_text)
    stream_text: bool = True
    stats: SequenceStats = field(default_factory=SequenceStats)
    generator: Any = None  # torch.Generator of a seeded request

    # fixed by spec and router for the sequence's life, so read per step as plain attributes (__post_init__)
    mode: str = field(init=False, repr=False)  # token | step | speculative (the spec's): how the engine decodes it
    uses_small: bool = field(init=False, repr=False)  # the small model runs on it
    uses_large: bool = field(init=False, repr=False)  # the large model may write its tokens
    routes_all: bool = field(init=False, repr=False)  # the large model writes every token
    reads_top1: bool = field(init=False, repr=False)  # its router reads the top-1 probability (Router.reads_top1)
    # token mode: the top-1 probability from which its router routes nothing (Router.gate; None: none, or a mode
    # whose router answers for a whole step)
    gate: float | None = field(init=False, repr=False)

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        self.mode = self.spec.mode
        self.routes_all = self.router is not None and self.router.routes_all
        self.uses_small = not self.routes_all
        self.uses_large = self.router is None or self.router.uses_large
        self.reads_top1 = self.router is not None and self.router.reads_top1
        self.gate = self.router.gate if self.router is not None and self.mode == "token" else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def large_owned(self) -> bool:
        """The large model writes the next token without asking the small model (which lags)."""
        return self.routes_all or self.step_owner == LARGE

    @property
    def lookahead(self) -> int:
        """KV slots beyond the sequence's tokens a step may need: speculative drafts and the bonus token."""
        return self.spec.k + 1 if self.mode == "speculative" else 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prompt_scorer(self) -> str:
        """The model whose prompt logprobs a request gets: the large one whenever the request may use it
        (its prompt is then prefilled by the large model eagerly), the small one under `small` routing."""
        return LARGE if self.uses_large else SMALL

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The request asked for prompt logprobs and the prompt has not been scored yet."""
        return self.sampling.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append(self, token_id: int, source: str) -> None:
        self.token_ids.append(token_id)
        self.provenance.append(source)
        if source == LARGE:
            self.stats.num_large_tokens += 1
        else:
            self.stats.num_small_tokens += 1

    def reset_for_recompute(self) -> None:
        """After preemption: no cache holds anything; output so far is kept and re-prefilled."""
        self.num_cached = {SMALL: 0, LARGE: 0}
        self.status = Status.WAITING
        self.waiting_since = None  # its next token will be proposed and routed again
        self.stats.num_preemptions += 1
