"""Postprocessing: the one place a token is appended to a sequence and a request's end is decided.

    OutputProcessor.append(seq, token, source, sample, row)   token, provenance, logprobs
    OutputProcessor.stop_reason(seq)                           EOS / stop token / max_tokens / context
    OutputProcessor.postprocess(seq, num_new) -> RequestOutput detokenize, stop strings, step ends, finish
    OutputProcessor.flush_text(seq) -> str                     text not yet sent, of a sequence that does
                                                               not stream text (seq.stream_text False)
    OutputProcessor.fail(seq, failure) -> RequestOutput        it cannot go on: end it with an error

Token-level steps and speculative verification both commit through these. The step's own records live here
too: a Proposal (a sequence's candidate token this step, and who wrote it) and a Generation (a finished
request, for the offline API).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from collab_decode.engine.sequence import LARGE, SMALL, Sequence
from collab_decode.sampling import SampleOutput, check_stop


@dataclass(slots=True)  # (made once per sequence per step)
class RequestOutput:
    """One request's progress in one step (streamed) or at its end."""

    seq_id: int
    new_token_ids: list[int]  # tokens committed this step
    new_text: str  # text they added (held back while a stop string or a UTF-8 sequence may be partial)
    new_provenance: list[str]  # "small" / "large" per new token
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (seq.error says why) | None
    seq: Sequence = field(repr=False)


class Detokenizer:
    """Incremental detokenization: each step decodes only a short window around the new tokens.

    The window starts a few tokens back (`detok_offsets`) so tokenizers whose rendering of a token
    depends on its neighbours (leading spaces, byte fallback) come out as a full decode would.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
            # a fast tokenizer that adds nothing to its Rust decode: call that directly (~5x cheaper a step)
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self, seq: Sequence, final: bool) -> None:
        prefix, read = seq.detok_offsets
        ids = seq.token_ids[seq.num_prompt_tokens + prefix:]  # the output from the window's start
        before = self.decode(ids[:read - prefix]) if read > prefix else ""
        after = self.decode(ids)
        if after.endswith("\ufffd") and not final:
            return  # an incomplete UTF-8 sequence: wait for its next byte
        seq.decoded_text += after[len(before):]
        seq.detok_offsets = (read, prefix + len(ids))

    def update(self, seq: Sequence, final: bool = False) -> tuple[str, bool]:
        """Text added since the last call, and whether a stop string ended the output.

        seq.output_text holds what was emitted. While the output might still end in a stop string,
        its last len(stop) - 1 characters are held back, so streamed text never has to be taken back;
        `final` releases them.
        """
        self._decode_new(seq, final)
        text, emitted, stops = seq.decoded_text, seq.output_text, seq.sampling.stop
        stop_at = check_stop(text, len(emitted), stops) if stops else None
        if stop_at is not None:
            text = text[:stop_at]
        elif stops and not final:
            text = text[:max(len(emitted), len(text) - (max(map(len, stops)) - 1))]
        if not text.startswith(emitted):
            return "", stop_at is not None
        seq.output_text = text
        return text[len(emitted):], stop_at is not None


def record_prompt_logprobs(seq: Sequence, start: int, logits: torch.Tensor) -> None:
    """Score the prompt tokens a forward's rows predict: row r (position start + r) gives token start + r + 1
    its logprob, rank and the top-n there. Entries are appended in order, so a chunk run again (after a
    preemption) or by a second model adds nothing. logits: (n, V) raw."""
    if not seq.prompt_logprobs:
        seq.prompt_logprobs.append(None)  # the first token has no context
    first, end = len(seq.prompt_logprobs), min(start + len(logits) + 1, seq.num_prompt_tokens)
    if first >= end or first <= start:
        return
    rows = logits[first - 1 - start:end - 1 - start].float().log_softmax(dim=-1)  # (m, V)
    targets = torch.tensor(seq.prompt_ids[first:end], device=rows.device)  # (m,)
    chosen = rows.gather(-1, targets[:, None])  # (m, 1)
    ranks = (rows > chosen).sum(dim=-1) + 1  # (m,)
    top_lp, top_ids = rows.topk(seq.sampling.prompt_logprobs, dim=-1)  # (m, n)
    for lp, rank, ids, lps in zip(chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_lp.tolist()):
        seq.prompt_logprobs.append((lp, rank, list(zip(ids, lps))))


# what kind of failure ended a request (Failure.code; the server's status follows it)
MODEL_ERROR = "model_error"  # a model computed something unusable for it (non-finite logits): retrying will not help
INTERNAL_ERROR = "internal_error"  # the engine raised on it (a router, a stop rule): a fault of the server
UPSTREAM_ERROR = "upstream_error"  # a backend could not run it (a remote endpoint down or refusing): may pass later


@dataclass(frozen=True)
class Failure:
    """Why a request ends with finish reason "error": the message its client reads, and its kind."""

    message: str
    code: str


def nonfinite_error(model: str) -> Failure:
    """A request whose next-token logits hold NaN or inf (a numerical fault of the model on it)."""
    return Failure(f"the {model} model's logits for this request are not finite (NaN or inf): it cannot go on",
                   MODEL_ERROR)


def internal_error(doing: str, seq_id: int) -> Failure:
    """A request that raised while the engine was {doing} it (the traceback goes to the log only)."""
    return Failure(f"internal error while {doing} this request (sequence {seq_id}); the server logged the details",
                   INTERNAL_ERROR)


def upstream_error(message: str) -> Failure:
    """A request a backend could not run (BackendError's message for it)."""
    return Failure(message, UPSTREAM_ERROR)


def make_output(seq: Sequence, num_new: int, new_text: str) -> RequestOutput:
    return RequestOutput(
        seq_id=seq.seq_id,
        new_token_ids=seq.token_ids[len(seq.token_ids) - num_new:] if num_new else [],
        new_text=new_text,
        new_provenance=seq.provenance[len(seq.provenance) - num_new:] if num_new else [],
        finished=seq.finished,
        finish_reason=seq.finish_reason,
        seq=seq,
    )


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int, step_delimiter: str,
                 finish: Callable[[Sequence, str], None]):
        self.detokenizer = Detokenizer(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.step_delimiter = step_delimiter
        self.finish = finish  # frees a finished sequence's blocks and forgets it (the engine's)

    def append(self, seq: Sequence, token: int, source: str, sample: SampleOutput, row: int) -> None:
        """Commit one token that `source` wrote; row `row` of `sample` holds its logprobs if asked."""
        seq.append(token, source)
        if seq.router is not None:
            seq.router.observe(seq.router_state, source == LARGE)
        if seq.sampling.logprobs is not None:
            seq.logprobs.append(float(sample.logprobs[row]))
            if sample.top_ids is not None and seq.sampling.logprobs > 0:
                n = seq.sampling.logprobs
                seq.top_logprobs.append(list(zip(sample.top_ids[row, :n].tolist(),
                                                 sample.top_logprobs[row, :n].tolist())))

    def stop_reason(self, seq: Sequence) -> str | None:
        """Whether the newest token ends the request ("stop" / "length"), before stop strings."""
        last = seq.token_ids[-1]
        if (last in self.eos_token_ids and not seq.sampling.ignore_eos) or last in seq.sampling.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def postprocess(self, seq: Sequence, num_new: int) -> RequestOutput:
        """After a step committed num_new tokens: detokenize, apply stop strings, track step ends, finish."""
        reason = self.stop_reason(seq)
        new_text, stopped = "", False
        step_mode = seq.mode == "step"
        if reason is not None or seq.stream_text or seq.sampling.stop or step_mode:
            new_text, stopped = self.detokenizer.update(seq, final=reason is not None)
        if stopped:
            reason = "stop"
        if step_mode and self._ends_step(seq):
            seq.step_owner = None  # the next position starts a step: the router decides again
        if reason is not None:
            self.finish(seq, reason)
        return make_output(seq, num_new, new_text)

    def flush_text(self, seq: Sequence) -> str:
        """The text of an unfinished sequence's tokens not yet in an output's new_text (a sequence that does
        not stream text is detokenized here, a window of several tokens at once, when its caller sends)."""
        return self.detokenizer.update(seq)[0]

    def fail(self, seq: Sequence, failure: Failure) -> RequestOutput:
        """End a request that cannot go on (a BackendError, non-finite logits, an error of its own while
        routing or committing): finish reason "error", seq.error says why (seq.error_code: its kind), blocks
        freed."""
        seq.error, seq.error_code = failure.message, failure.code
        self.finish(seq, "error")
        return make_output(seq, 0, "")

    def _ends_step(self, seq: Sequence) -> bool:
        # read from all text decoded so far, not from output_text (which holds back characters); while a
        # UTF-8 character is incomplete the decoded text is stale and ends no step
        pending = seq.detok_offsets[1] < seq.num_output_tokens
        return not pending and seq.decoded_text.endswith(self.step_delimiter)


@dataclass(slots=True)  # (made once per sequence per step)
class Proposal:
    """A sequence's candidate next token this step, and who wrote it."""

    seq: Sequence
    sample: SampleOutput | None = None  # holds the token (None until sampled)
    row: int = 0  # row of that SampleOutput
    routed: bool = False  # the large model writes this token
    source: str = SMALL
    error: Failure | None = None  # why this request fails this step (postprocess ends it instead of committing)


@dataclass
class Generation:
    """A finished request, for the offline API and the CLI."""

    text: str
    token_ids: list[int]
    provenance: list[str]
    finish_reason: str
    stats: dict
    prompt_token_ids: list[int]
    logprobs: list[float]
    error: str | None = None  # why it failed (finish_reason "error")

    @classmethod
    def from_sequence(cls, seq: Sequence) -> "Generation":
        return cls(text=seq.output_text, token_ids=seq.output_ids, provenance=list(seq.provenance),
                   finish_reason=seq.finish_reason, stats=seq.stats.as_dict(),
                   prompt_token_ids=list(seq.prompt_ids), logprobs=list(seq.logprobs), error=seq.error)
