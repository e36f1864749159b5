"""OpenAI-compatible request schemas (strictly typed: "5" is not a number) and response pieces.

Standard fields follow OpenAI's API; extensions (vLLM's where one exists):
  routing            "entropy:0.6" or {"policy": "entropy", "threshold": 0.6} (speculative: "k"; neural: "router")
  return_provenance  true: each choice also carries `token_ids` and `provenance` ("small"/"large" per token)
  top_k, ignore_eos, stop_token_ids
  prompt_logprobs, return_tokens_as_token_ids (completions; vLLM's, so a collab-decode server can be the
                     endpoint of another one's remote large model)
Completions take a list of prompts and `n` choices per prompt: choice `index` = prompt_index * n + i
(OpenAI's and vLLM's order); with a seed, choice i samples with seed + i (vLLM's), so choices differ.
`echo` puts the prompt before each choice's text and, with `logprobs`, its tokens before the output's in
the logprobs object (the first one's logprob null), scored by the model `prompt_scorer` names (the large
one unless routing is `small`); `max_tokens` 0 with echo scores the prompt only (as lm-evaluation-harness
asks). Prompt tokens count once per prompt in `usage`; everything else sums over the choices.
`usage` gains small_tokens, large_tokens, large_share and large_calls; its prompt_tokens_details.cached_tokens
(OpenAI's) counts the prompt tokens the prefix cache held.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from collab_decode.sampling import MAX_LOGPROBS, SamplingParams
from collab_decode.serve.async_engine import Delta
from collab_decode.serve.requests import MAX_N, InvalidRequest, choice_samplings

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

log = logging.getLogger(__name__)
MAX_LOGGED_FIELDS, MAX_LOGGED_NAME = 10, 64  # unknown fields named per request model, characters of each


class _Strict(BaseModel):
    """Fields of the wrong type are refused; fields this server does not know are ignored, with a warning in its
    log naming them (as vLLM does): a misspelt parameter (`max_token`) would otherwise pass unseen."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _warn_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):  # (a null field sets nothing: clients send `refusal: null` and the like)
            ignored = [k for k, v in data.items() if k not in cls.model_fields and v is not None]
            if ignored:  # the client's names, quoted and cut: they must not write lines of their own
                names = ", ".join(repr(str(k)[:MAX_LOGGED_NAME]) for k in ignored[:MAX_LOGGED_FIELDS])
                more = f" (+{len(ignored) - MAX_LOGGED_FIELDS} more)" if len(ignored) > MAX_LOGGED_FIELDS else ""
                log.warning("%s: ignored field(s) this server does not know: %s%s", cls.__name__, names, more)
        return data


class StreamOptions(_Strict):
    include_usage: bool = False  # one last chunk with empty choices and the usage


class _GenerationRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None: 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    # accepted only at their neutral values
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # extensions
    routing: str | dict[str, Any] | None = None
    return_provenance: bool = False
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def check_supported(self) -> None:
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}], got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequest(f"{name} is not supported by this server", param=name)
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this server", param="logit_bias")

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
                        ) -> SamplingParams:
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must be in [-2**63, 2**64), got {self.seed}", param="seed")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def choice_samplings(self, sampling: SamplingParams) -> list[SamplingParams]:
        """One SamplingParams per choice of a prompt: with a seed, choice i samples with seed + i."""
        return choice_samplings(sampling, self.n or 1)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # chosen token + the top n alternatives (n <= 20)
    prompt_logprobs: int | None = None  # per prompt token: its logprob + the top n there (vLLM's extension)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:ID" (vLLM's extension)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1, self.n or 1):
            raise InvalidRequest("best_of must equal n on this server (no server-side reranking)", param="best_of")
        if self.suffix:
            raise InvalidRequest("suffix is not supported by this server", param="suffix")
        if not self.prompts():
            raise InvalidRequest("prompt must hold at least one prompt", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids: one, or a batch."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: score the prompt, generate nothing."""
        return self.echo and self.max_tokens == 0

    def engine_sampling(self) -> SamplingParams:
        """What the engine runs for each choice. Echo-only requests generate one token that is dropped
        (vLLM's way); echoed logprobs ask prompt logprobs with as many alternatives."""
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, prompt_logprobs or 0)
        return self.sampling_params(1 if self.echo_only else max_tokens, self.logprobs, prompt_logprobs)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # newer name for max_tokens; wins when both are given
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token (needs logprobs: true)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise InvalidRequest("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequest("response_format other than text is not supported", param="response_format")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ErrorDetail(BaseModel):
    message: str  # what was wrong, for a person; never an internal exception's text
    type: str  # invalid_request_error | rate_limit_error | server_error | not_found_error
    param: str | None = None  # the request field at fault, when one is
    code: str | None = None  # a machine-readable kind (prompt_too_long, invalid_unicode, server_busy, ...)


class ErrorResponse(BaseModel):
    """Every error body, REST (OpenAI's shape); the OpenAPI schema documents it for each error status."""

    error: ErrorDetail


def usage(choices: list[list[Delta]], n: int = 1) -> dict:
    """OpenAI usage of a request's choices (each its deltas so far; n per prompt, so prompt tokens count
    once per prompt, as vLLM counts them) plus how many tokens each model wrote."""
    lasts = [c[-1] for c in choices if c]
    num_prompt = sum(c[-1].num_prompt_tokens for c in choices[::n] if c)
    num_output = sum(len(d.token_ids) for c in choices for d in c)
    small, large = (sum(d.stats[key] for d in lasts) for key in ("small_tokens", "large_tokens"))
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output, "total_tokens": num_prompt + num_output,
            "small_tokens": small, "large_tokens": large, "large_share": large / (small + large) if small + large
            else 0.0, "large_calls": sum(d.stats["large_calls"] for d in lasts),
            "prompt_tokens_details": {"cached_tokens": sum(c[-1].stats["cached_tokens"] for c in choices[::n] if c)}}


def completion_logprobs(tokenizer, deltas: list[Delta], text_offset: int = 0, as_token_ids: bool = False) -> dict:
    """The /v1/completions `logprobs` object for these deltas' tokens; `as_token_ids` names each token
    "token_id:ID" (vLLM's return_tokens_as_token_ids) instead of its text."""
    name = (lambda t: f"token_id:{t}") if as_token_ids else (lambda t: _piece(tokenizer, t))
    tokens, token_logprobs, top, offsets = [], [], [], []
    for d in deltas:
        for i, token_id in enumerate(d.token_ids):
            offsets.append(text_offset)
            text_offset += len(_piece(tokenizer, token_id))
            tokens.append(name(token_id))
            token_logprobs.append(d.logprobs[i] if i < len(d.logprobs) else None)
            if i < len(d.top_logprobs):
                top.append({name(t): lp for t, lp in d.top_logprobs[i]})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top or None, "text_offset": offsets}


def echo_logprobs(tokenizer, prompt_ids: list[int], entries: list, num_top: int, as_token_ids: bool = False) -> dict:
    """The prompt's part of an echoed completion's `logprobs`: per prompt token its name, its logprob (null
    for the first token), its top `num_top` there with the token itself (vLLM's), its offset in the echo."""
    name = (lambda t: f"token_id:{t}") if as_token_ids else (lambda t: _piece(tokenizer, t))
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for token, entry in zip(prompt_ids, entries):
        tokens.append(name(token))
        offsets.append(offset)
        offset += len(_piece(tokenizer, token))
        if entry is None:  # the first token has no context
            token_logprobs.append(None)
            top.append(None)
            continue
        lp, _, alternatives = entry
        token_logprobs.append(_json_logprob(lp))
        top.append({name(token): _json_logprob(lp), **{name(t): _json_logprob(x) for t, x in alternatives[:num_top]}})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _json_logprob(logprob: float) -> float:
    """-inf (a token outside a remote endpoint's top K) as vLLM writes it: -9999.0 (JSON has no infinity)."""
    return max(logprob, -9999.0)


def join_logprobs(echoed: dict, generated: dict) -> dict:
    """An echoed prompt's logprobs object followed by the generated tokens' (OpenAI's echo)."""
    return {key: echoed[key] + (generated[key] or []) for key in echoed}


def prompt_logprobs(tokenizer, prompt_ids: list[int], entries: list, num_top: int = MAX_LOGPROBS) -> list:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token {"ID": {"logprob", "rank",
    "decoded_token"}} for the token itself, then the top `num_top` at its position."""
    out: list = [None] if entries else []
    for token, (lp, rank, top) in zip(prompt_ids[1:], entries[1:]):
        scored = {token: {"logprob": lp, "rank": rank}}
        for i, (t, x) in enumerate(top[:num_top]):
            scored.setdefault(t, {"logprob": x, "rank": i + 1})
        out.append({str(t): {**v, "decoded_token": _piece(tokenizer, t)} for t, v in scored.items()})
    return out


def chat_logprobs(tokenizer, deltas: list[Delta]) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for d in deltas:
        for i, token_id in enumerate(d.token_ids):
            alternatives = d.top_logprobs[i] if i < len(d.top_logprobs) else []
            content.append({**_token_entry(tokenizer, token_id, d.logprobs[i] if i < len(d.logprobs) else None),
                            "top_logprobs": [_token_entry(tokenizer, t, lp) for t, lp in alternatives]})
    return {"content": content}


def provenance_fields(deltas: list[Delta]) -> dict:
    return {"token_ids": [t for d in deltas for t in d.token_ids],
            "provenance": [p for d in deltas for p in d.provenance]}


def _token_entry(tokenizer, token_id: int, logprob: float | None) -> dict:
    piece = _piece(tokenizer, token_id)
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])
