"""The demo task: determinism, disjoint splits, correct worked solutions, the evaluator, the tokenizer."""

from __future__ import annotations

import re

import pytest

from collab_decode.demo.task import (HELDOUT_SEED_BASE, STEP_DELIMITER, extract_answer, is_correct, make_problem,
                                     problems)
from collab_decode.demo.tokenizer import EOS, chat_prompt


def test_problems_are_deterministic_and_splits_disjoint():
    assert make_problem(7) == make_problem(7)
    train = {p.seed for p in problems("train", 50)}
    heldout = {p.seed for p in problems("heldout", 50)}
    assert not train & heldout
    assert min(heldout) == HELDOUT_SEED_BASE
    with pytest.raises(ValueError, match="unknown split"):
        problems("test", 1)


def test_worked_solutions_reach_the_answer_by_their_own_arithmetic():
    for p in problems("train", 300):
        assert is_correct(p.solution, p.answer)
        steps = p.solution.split(STEP_DELIMITER)
        assert len(steps) >= 3  # at least two operations and the answer
        for line in p.solution.splitlines():
            if line[:1].isdigit():  # a column line: "a+b+c=s, write d carry c." or "a-b-c=..."
                lhs, _, rest = line.partition("=")
                a, op, b, c = lhs[0], lhs[1], lhs[2], lhs[4]
                value = int(a) + int(b) + int(c) if op == "+" else int(a) - int(b) - int(c)
                assert rest.startswith(str(value)), line


def test_each_step_starts_with_the_tag_of_its_operation_in_the_question():
    for p in problems("train", 100):
        asked = dict(re.findall(r"\(([abc])\) [^.0-9]*(\d+)", p.question))  # tag -> amount, "(b) Then he sells 270."
        steps = [re.match(r"\(([abc])\) [^,0-9]*(\d+),", s) for s in p.solution.split(STEP_DELIMITER)]
        worked = [m.groups() for m in steps if m]
        assert 2 <= len(asked) <= 3 and [tag for tag, _ in worked] == list("abc"[:len(asked)])
        assert dict(worked) == asked, (p.question, p.solution)


def test_stylistic_freedom_exists():
    openings = {p.solution.split("\n")[0].split(" ")[0] for p in problems("train", 200)}
    assert len(openings) > 3  # optional restatement, pronouns, connectives


@pytest.mark.parametrize("text, answer, expected", [
    ("... So 352 + 179 = 531.\n\nThe answer is 531.", 531, True),
    ("The answer is 531", 531, True),  # final period optional
    ("So the answer is 530.", 531, False),  # wrong
    ("The answer is 531. And more text", 531, False),  # not at the end: malformed
    ("531", 531, False),  # no answer line
    ("", 531, False),
    ("The answer is five hundred.", 500, False),
])
def test_evaluator(text, answer, expected):
    assert is_correct(text, answer) is expected


def test_extract_answer_malformed_is_none():
    assert extract_answer("no answer here") is None
    assert extract_answer("The answer is 12.") == 12


def test_tokenizer_round_trip_and_chat_template():
    from transformers import AutoTokenizer

    from collab_decode.demo import checkpoint_dir

    tok = AutoTokenizer.from_pretrained(str(checkpoint_dir("small")))
    for p in problems("heldout", 20):
        text = chat_prompt(p.question) + p.solution + EOS
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        pieces = [tok.decode([i]) for i in ids]
        # a digit is always a token of its own, so each digit has one id wherever it stands
        assert all(piece in "0123456789" for piece in pieces if any(ch.isdigit() for ch in piece)), pieces
    assert tok.convert_tokens_to_ids(tok.tokenize(" 7")) == tok.convert_tokens_to_ids(tok.tokenize(" ")) + [
        tok.convert_tokens_to_ids(tok.tokenize("7"))[0]]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False, add_generation_prompt=True)
    assert rendered == chat_prompt("Q?")
    odd = "naïve ünïcode → 42\t"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
