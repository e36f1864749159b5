"""What a labelling run is asked to do: one frozen dataclass, validated on construction, documented field by
field (the CLI derives its flags and help from these fields; the manifest records them)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

VERIFIERS = ("answer", "judge", "exact")
STAGES = ("traces", "forcing", "continuations", "verify", "dataset")  # stages 0-4, in order
# settings that do not change what is written: a resumed run may change them
NOT_IN_OUTPUT = ("judge_concurrency",)


def unescape(text: str) -> str:
    """\\n, \\t and \\\\ typed on a command line -> newline, tab, backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _field(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class LabelSettings:
    verifier: str = _field("answer", "how a mismatch is labelled neutral or divergent: answer (finish the branch, "
                           "check its final answer), judge (a chat model compares the two continuations), "
                           "exact (the continuations differ at all)", choices=VERIFIERS)
    max_tokens: int = _field(512, "most tokens of a reference trace, and of a branch's whole response (answer)")
    continuation_tokens: int = _field(32, "judge/exact: most tokens a branch is continued (it also stops at the "
                                      "step delimiter)")
    step_delimiter: str = _field("\n\n", "judge/exact: the text that ends a reasoning step (\\n, \\t read as "
                                 "escapes)", type=unescape)
    top_k: int = _field(100, "sorted top-k logits in the router features (a router may use a prefix of them)")
    batch_size: int = _field(64, "sequences the engine decodes together (traces, continuations)")
    forced_tokens: int = _field(8192, "most tokens in one teacher-forcing forward of the small model")
    shard_size: int = _field(100, "queries per shard (the unit of resumption)")
    answer_checker: str | None = _field(None, "answer: a Python callable module:function(text, answer) -> bool "
                                        "(default: a regex on 'answer is X' or \\boxed{X})", type=str)
    judge_url: str | None = _field(None, "judge: base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1",
                                   type=str)
    judge_model: str | None = _field(None, "judge: the model name sent with each request", type=str)
    judge_template: str | None = _field(None, "judge: a file holding the prompt template, with {context}, "
                                        "{reference} and {candidate} (default: labels/judge.py)", type=str)
    judge_max_tokens: int = _field(16, "judge: most tokens of a reply")
    judge_concurrency: int = _field(8, "judge: requests in flight at once")

    def __post_init__(self):
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {', '.join(VERIFIERS)}, got {self.verifier!r}")
        for name in ("max_tokens", "continuation_tokens", "top_k", "batch_size", "forced_tokens", "shard_size",
                     "judge_max_tokens", "judge_concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
        if self.answer_checker is not None and self.answer_checker.count(":") != 1:
            raise ValueError(f"answer_checker must be module:function, got {self.answer_checker!r}")
        if self.verifier == "judge" and not (self.judge_url and self.judge_model):
            raise ValueError("the judge verifier needs judge_url and judge_model (--judge-url, --judge-model)")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def output_dict(self) -> dict:
        """The settings that decide what is written: a resumed run must give the same."""
        return {k: v for k, v in self.as_dict().items() if k not in NOT_IN_OUTPUT}


def parse_steps(text: str) -> list[str]:
    """`all`, stage numbers and ranges (`0-2`, `3,4`) or names (`traces,forcing`) -> stage names in order."""
    if text.strip() == "all":
        return list(STAGES)
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if part in STAGES:
            chosen.add(STAGES.index(part))
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad step {part!r}: use all, numbers 0-4, ranges (0-2) or names "
                             f"({', '.join(STAGES)})") from None
        if not 0 <= first <= last < len(STAGES):
            raise ValueError(f"bad step range {part!r}: stages are numbered 0-{len(STAGES) - 1}")
        chosen.update(range(first, last + 1))
    return [STAGES[i] for i in sorted(chosen)]
