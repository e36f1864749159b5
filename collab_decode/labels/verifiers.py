"""Stage 3, verifiers: is a mismatch *neutral* (wording only) or *divergent* (the reasoning goes elsewhere)?

    Branch (continued) + its Trace + its Query -> Verifier.label -> Verdict(label, detail)

- `answer`: the branch is finished and its final answer checked: with a gold answer, by the checker (a regex
  on "answer is X" / \\boxed{X} by default, or the user's `module:function(text, answer) -> bool`); without
  one, against the answer the reference trace gives. Neutral if right, divergent if not. A query whose
  reference trace is wrong (or gives no answer) cannot say whether a deviation breaks it: `skipped`.
- `exact`: the branch's step (its token + continuation, cut at the step delimiter) differs from the
  reference's step at all: divergent; else neutral.
- `judge` (labels/judge.py): a chat model compares the two steps; a reply it cannot parse is `unparsed`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable

from collab_decode.labels.continuations import SKIPPED, Branch
from collab_decode.labels.queries import Query
from collab_decode.labels.settings import LabelSettings
from collab_decode.labels.traces import Trace

LABELS = ("identical", "neutral", "divergent", "unparsed", "skipped")  # codes 0-4 in the dataset

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)", re.IGNORECASE)
_NUMBER = re.compile(r"^\$?\s*(-?[\d,]*\.?\d+)")


@dataclass
class Verdict:
    label: str  # neutral | divergent | unparsed | skipped
    detail: dict = field(default_factory=dict)  # what decided it (the branch's answer, the judge's reply)


def extract_answer(text: str) -> str | None:
    """The final answer a text gives: its last \\boxed{X}, else what follows its last "answer is" /
    "answer:" (its leading number, commas dropped, if it starts with one), else None."""
    boxed = _BOXED.findall(text)
    if boxed:
        return _tidy(boxed[-1])
    stated = list(_ANSWER_IS.finditer(text))
    if not stated:
        return None
    value = _tidy(text[stated[-1].end():].split("\n", 1)[0])
    number = _NUMBER.match(value)
    return number.group(1).replace(",", "") if number else (value or None)


def _tidy(text: str) -> str:
    return text.strip().strip("*").strip().rstrip(".").strip().strip("*").strip()


def same_answer(a, b) -> bool:
    """Two answers agree: equal as numbers (1,000 = 1000.0), else equal as text ignoring case and spaces."""
    na, nb = str(a).replace(",", "").strip(), str(b).replace(",", "").strip()
    try:
        return Decimal(na.lstrip("$")) == Decimal(nb.lstrip("$"))
    except InvalidOperation:
        return " ".join(na.split()).casefold() == " ".join(nb.split()).casefold()


def default_checker(text: str, answer) -> bool:
    """The text's final answer (extract_answer) is `answer`."""
    got = extract_answer(text)
    return got is not None and same_answer(got, answer)


def load_checker(spec: str) -> Callable[[str, object], bool]:
    """`module:function` -> the callable; ValueError naming what is missing."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"answer checker {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"answer checker {spec!r}: {module_name} has no callable {name!r}")
    return fn


class Verifier:
    """Base: how far branches run, which queries can be labelled, and the labelling itself."""

    stop: tuple[str, ...] = ()  # stop strings of a continuation

    def __init__(self, tokenizer, settings: LabelSettings, queries: dict[int, Query]):
        self.tokenizer = tokenizer
        self.settings = settings
        self.queries = queries  # by query index

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def can_label(self, trace: Trace) -> bool:
        return True

    def budget(self, branch: Branch) -> int:
        """Most tokens the large model continues this branch."""
        return self.settings.continuation_tokens

    def label(self, items: list[tuple[Branch, Trace]]) -> list[Verdict]:
        raise NotImplementedError

    def steps(self, branch: Branch, trace: Trace) -> tuple[str, str]:
        """(reference step, branch step): each from the mismatch position, as many tokens as the branch may
        have, cut before the step delimiter."""
        n = 1 + self.settings.continuation_tokens
        reference = self.decode(trace.response_ids[branch.position:branch.position + n])
        candidate = self.decode([branch.small_token] + branch.continuation_ids)
        return cut_step(reference, self.settings.step_delimiter), cut_step(candidate, self.settings.step_delimiter)


def cut_step(text: str, delimiter: str) -> str:
    """The text up to (not including) the first delimiter."""
    at = text.find(delimiter)
    return text if at < 0 else text[:at]


class AnswerVerifier(Verifier):
    def __init__(self, tokenizer, settings: LabelSettings, queries: dict[int, Query]):
        super().__init__(tokenizer, settings, queries)
        self.checker = load_checker(settings.answer_checker) if settings.answer_checker else default_checker
        if settings.answer_checker and not all(q.has_answer for q in queries.values()):
            missing = next(q.id for q in queries.values() if not q.has_answer)
            raise ValueError(f"query {missing!r} has no \"answer\": a custom --answer-checker needs one on every "
                             "query (without answers, the default checker compares with the reference's answer)")
        self._targets: dict[int, object] = {}  # query index -> the answer a branch must reach (None: none)

    def target(self, trace: Trace):
        """The answer branches are checked against: the gold answer if the reference reaches it, else None;
        without a gold answer, the reference trace's own answer."""
        if trace.query_index not in self._targets:
            query, text = self.queries[trace.query_index], self.decode(trace.response_ids)
            if query.has_answer:
                self._targets[trace.query_index] = query.answer if self.checker(text, query.answer) else None
            else:
                self._targets[trace.query_index] = extract_answer(text)
        return self._targets[trace.query_index]

    def can_label(self, trace: Trace) -> bool:
        return self.target(trace) is not None

    def budget(self, branch: Branch) -> int:
        return self.settings.max_tokens - (branch.position + 1)  # the branch's response within max_tokens

    def label(self, items: list[tuple[Branch, Trace]]) -> list[Verdict]:
        verdicts = []
        for branch, trace in items:
            if branch.finish_reason == SKIPPED:
                verdicts.append(Verdict(SKIPPED))
                continue
            text = self.decode(trace.response_ids[:branch.position] + [branch.small_token] + branch.continuation_ids)
            right = bool(self.checker(text, self.target(trace)))
            verdicts.append(Verdict("neutral" if right else "divergent", {"branch_answer": extract_answer(text)}))
        return verdicts


class ExactVerifier(Verifier):
    @property
    def stop(self) -> tuple[str, ...]:
        return (self.settings.step_delimiter,)

    def label(self, items: list[tuple[Branch, Trace]]) -> list[Verdict]:
        verdicts = []
        for branch, trace in items:
            reference, candidate = self.steps(branch, trace)
            verdicts.append(Verdict("neutral" if reference == candidate else "divergent"))
        return verdicts
