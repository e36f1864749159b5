"""The demo task: multi-step arithmetic word problems with worked, column-by-column solutions.

A problem is a start amount and 2-3 operations (add or subtract). The worked solution restates
each operation, then computes it one column at a time, least-significant digit first, with the carry
(or borrow) written out, so every step the model takes is local:

    Ann has 352 marbles. (a) She finds 179 more. (b) Then she gives away 86. How many marbles does Ann have now?

    Ann starts with 352 marbles.

    (a) She finds 179, so we add: 352 + 179.
    2+9+0=11, write 1 carry 1.
    5+7+1=13, write 3 carry 1.
    3+1+1=5, write 5 carry 0.
    So 352 + 179 = 531.

    (b) Next she gives away 86, so we subtract: 531 - 086.
    ...
    The answer is 445.

Each operation carries a tag, "(a)", "(b)", "(c)", in the question and at the start of its solution step:
the step copies its amount from the question, and the tag makes that a match on content (find the
same tag, read the number after it) rather than a count of sentences.

The text has stylistic freedom that never changes the answer (optional restatement, interchangeable
connectives and phrasings, chosen by the problem's own random stream), so a small and a large
model can disagree on wording (neutral) as well as on digits (divergent).

Seeds: problem `i` of a split is generated from `random.Random(seed)` with
`seed = SPLIT_BASE[split] + i`. Training uses seeds in [0, 1e9); held-out problems use seeds from
1e9 up. The two ranges never overlap, so held-out problems are never trained on (a collision of
the generated text itself is possible in principle and does not matter for accuracy).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TRAIN_SEED_BASE = 0
HELDOUT_SEED_BASE = 1_000_000_000
SPLIT_BASE = {"train": TRAIN_SEED_BASE, "heldout": HELDOUT_SEED_BASE}

STEP_DELIMITER = "\n\n"
MAX_VALUE = 999  # every running total stays within [MIN_VALUE, MAX_VALUE]: 3 columns
MIN_VALUE = 100

NAMES = [("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dev", "He"), ("Eli", "He"),
         ("Fay", "She"), ("Gus", "He"), ("Hana", "She"), ("Ivo", "He"), ("Jo", "She")]
ITEMS = ["apples", "coins", "marbles", "stamps", "books", "shells", "cards", "beads"]
ADD_VERBS = ["finds", "buys", "gets", "is given"]
SUB_VERBS = ["gives away", "loses", "sells", "uses"]
OPENERS = ["{name} starts with {n} {item}.", "At first {name} has {n} {item}."]
CONNECTIVES = ["Then", "Next", "After that"]
ADD_PHRASES = ["so we add", "so we add them"]
SUB_PHRASES = ["so we subtract", "so we take it away"]
CLOSERS = ["The answer is {n}.", "So the answer is {n}."]

ANSWER_RE = re.compile(r"answer is (-?\d+)\.?\s*$")


@dataclass(frozen=True)
class Problem:
    seed: int
    question: str
    solution: str  # the worked solution, ending with the answer line
    answer: int


def _column_lines(a: int, b: int, op: str) -> list[str]:
    """One line per column of a +/- b, least significant first; a, b, result in [0, 999]."""
    lines, carry = [], 0
    for col in range(3):
        da, db = a // 10**col % 10, b // 10**col % 10
        if op == "+":
            carry_in = carry
            total = da + db + carry_in
            digit, carry = total % 10, total // 10
            lines.append(f"{da}+{db}+{carry_in}={total}, write {digit} carry {carry}.")
        else:
            borrow_in = carry
            diff = da - db - borrow_in
            if diff < 0:
                carry = 1
                lines.append(f"{da}-{db}-{borrow_in}={diff}, add 10: {diff + 10}, write {diff + 10} borrow 1.")
            else:
                carry = 0
                lines.append(f"{da}-{db}-{borrow_in}={diff}, write {diff} borrow 0.")
    return lines


def _tag(index: int) -> str:
    return f"({'abc'[index]})"


def _operation_step(rng: random.Random, index: int, pronoun: str, total: int, amount: int, op: str,
                    verb: str) -> str:
    phrase = rng.choice(ADD_PHRASES if op == "+" else SUB_PHRASES)
    lead = pronoun if index == 0 else f"{rng.choice(CONNECTIVES)} {pronoun.lower()}"
    result = total + amount if op == "+" else total - amount
    head = f"{_tag(index)} {lead} {verb} {amount}, {phrase}: {total:03d} {op} {amount:03d}."
    return "\n".join([head, *_column_lines(total, amount, op), f"So {total} {op} {amount} = {result}."])


def make_problem(seed: int) -> Problem:
    """The problem with this seed (deterministic)."""
    rng = random.Random(seed)
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    start = total = rng.randint(MIN_VALUE + 50, MAX_VALUE - 50)
    ops: list[tuple[str, int, str]] = []
    for _ in range(rng.choice([2, 3])):
        can_add = total <= MAX_VALUE - 10
        can_sub = total >= MIN_VALUE + 10
        op = rng.choice(["+", "-"]) if can_add and can_sub else ("+" if can_add else "-")
        hi = MAX_VALUE - total if op == "+" else total - MIN_VALUE
        amount = rng.randint(10, hi)
        ops.append((op, amount, rng.choice(ADD_VERBS if op == "+" else SUB_VERBS)))
        total = total + amount if op == "+" else total - amount
    sentences = [f"{name} has {start} {item}."]
    for i, (op, amount, verb) in enumerate(ops):
        verb_phrase = f"{verb} {amount} more" if op == "+" else f"{verb} {amount}"
        sentences.append(f"{_tag(i)} {pronoun if i == 0 else 'Then ' + pronoun.lower()} {verb_phrase}.")
    sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)

    steps = []
    if rng.random() < 0.5:
        steps.append(rng.choice(OPENERS).format(name=name, n=start, item=item))
    running = start
    for i, (op, amount, verb) in enumerate(ops):
        steps.append(_operation_step(rng, i, pronoun, running, amount, op, verb))
        running = running + amount if op == "+" else running - amount
    steps.append(rng.choice(CLOSERS).format(n=running))
    return Problem(seed=seed, question=question, solution=STEP_DELIMITER.join(steps), answer=running)


def problems(split: str, num: int, offset: int = 0) -> list[Problem]:
    """`num` problems of `split` ('train' or 'heldout'), starting at index `offset`."""
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BASE)}")
    base = SPLIT_BASE[split]
    return [make_problem(base + offset + i) for i in range(num)]


def extract_answer(text: str) -> int | None:
    """The integer after 'answer is' at the end of `text`, or None if the text has no such line."""
    match = ANSWER_RE.search(text.strip())
    return int(match.group(1)) if match else None


def is_correct(text: str, answer: int) -> bool:
    """Exact match of the extracted answer; a malformed completion is wrong."""
    return extract_answer(text) == answer
