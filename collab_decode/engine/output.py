"""What the engine hands back per step, and incremental detokenization with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

from collab_decode.engine.sequence import Sequence
from collab_decode.sampling import check_stop


@dataclass
class RequestOutput:
    """One request's progress in one step (streamed) or at its end."""

    seq_id: int
    new_token_ids: list[int]  # tokens committed this step
    new_text: str  # text they added (held back while a stop string or a UTF-8 sequence may be partial)
    new_provenance: list[str]  # "small" / "large" per new token
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    seq: Sequence = field(repr=False)


class Detokenizer:
    """Incremental detokenization: each step decodes only a short window around the new tokens.

    The window starts a few tokens back (`detok_offsets`) so tokenizers whose rendering of a token
    depends on its neighbours (leading spaces, byte fallback) come out as a full decode would.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode_new(self, seq: Sequence, final: bool) -> None:
        ids = seq.output_ids
        prefix, read = seq.detok_offsets
        decode = self.tokenizer.decode
        before = decode(ids[prefix:read], skip_special_tokens=True) if read > prefix else ""
        after = decode(ids[prefix:], skip_special_tokens=True)
        if after.endswith("\ufffd") and not final:
            return  # an incomplete UTF-8 sequence: wait for its next byte
        seq.decoded_text += after[len(before):]
        seq.detok_offsets = (read, len(ids))

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


def make_output(seq: Sequence, num_new: int, new_text: str) -> RequestOutput:
    return RequestOutput(
        seq_id=seq.seq_id,
        new_token_ids=seq.output_ids[len(seq.output_ids) - num_new:] if num_new else [],
        new_text=new_text,
        new_provenance=seq.provenance[len(seq.provenance) - num_new:] if num_new else [],
        finished=seq.finished,
        finish_reason=seq.finish_reason,
        seq=seq,
    )
