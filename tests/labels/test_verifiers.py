"""Verifiers on hand-made cases: the default answer checker, a user's module:function, which queries can be
labelled, and the exact comparison of steps."""

from __future__ import annotations

import pytest

from collab_decode.labels.continuations import SKIPPED, Branch
from collab_decode.labels.queries import Query
from collab_decode.labels.settings import LabelSettings
from collab_decode.labels.traces import Trace
from collab_decode.labels.pipeline import make_verifier
from collab_decode.labels.verifiers import (AnswerVerifier, ExactVerifier, cut_step, default_checker,
                                            extract_answer, load_checker, same_answer)


@pytest.mark.parametrize("text, answer", [
    ("... So 531 - 86 = 445.\n\nThe answer is 445.", "445"),
    ("So the answer is 445", "445"),
    ("The answer is: **445**.", "445"),
    ("Answer: 1,234 apples", "1234"),
    ("The answer is $12.50.", "12.50"),
    ("the answer is -7.", "-7"),
    ("We get \\boxed{42}. The answer is 41.", "42"),  # \\boxed wins
    ("The answer is 3. Wait, no: the answer is 4.", "4"),  # the last statement
    ("The answer is Paris.", "Paris"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text", ["", "531 - 86 = 445.", "The answer is", "answers vary"])
def test_no_answer_is_none(text):
    assert extract_answer(text) is None


def test_same_answer_and_default_checker():
    assert same_answer("1,000", 1000) and same_answer("1000.0", "1e3") and same_answer("$5", "5")
    assert same_answer(" Paris ", "paris") and not same_answer("445", "446") and not same_answer("a", "b")
    assert default_checker("So the answer is 445.", 445)
    assert not default_checker("So the answer is 446.", 445)
    assert not default_checker("It is 445.", 445)  # no stated answer
    assert not default_checker("", 445)


def test_load_checker():
    assert load_checker("tests.labels.checkers:even_length")("ab", None) is True
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_checker("no_such_module:f")
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        load_checker("tests.labels.checkers:missing")
    with pytest.raises(ValueError, match="has no callable 'not_callable'"):
        load_checker("tests.labels.checkers:not_callable")


class Words:
    """A stand-in tokenizer: token id i is WORDS[i]."""

    WORDS = ["<eos>", " So", " the", " answer", " is", " 5", " 6", ".", "\n\n", " next", " thus", " ans", "wer"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.WORDS[i] for i in ids if not (skip_special_tokens and i == 0))


def query(index, answer=None):
    return Query(index, f"q{index}", "prompt", None, answer, None)


def test_answer_verifier_labels_against_the_gold_answer_and_skips_wrong_references():
    settings = LabelSettings(max_tokens=10)
    queries = {0: query(0, 5), 1: query(1, 5), 2: query(2)}
    verifier = AnswerVerifier(Words(), settings, queries)
    right = Trace(0, [9], [1, 2, 3, 4, 5, 7, 0], "stop")  # " So the answer is 5."
    wrong = Trace(1, [9], [1, 2, 3, 4, 6, 7, 0], "stop")  # says 6, gold is 5
    no_gold = Trace(2, [9], [1, 2, 3, 4, 6, 7, 0], "stop")  # no gold: the reference's own 6 is the target
    assert verifier.can_label(right) and not verifier.can_label(wrong) and verifier.can_label(no_gold)
    assert verifier.budget(Branch(0, 3, 3, 10)) == 10 - 4
    items = [(Branch(0, 1, 2, 10, [3, 4, 5, 7], "stop"), right),  # " So thus answer is 5." -> still 5: neutral
             (Branch(0, 4, 5, 6, [7], "stop"), right),  # " So the answer is 6." -> divergent
             (Branch(1, 4, 6, 5, [], SKIPPED), wrong),
             (Branch(2, 4, 6, 5, [7], "stop"), no_gold)]  # 5 where the reference said 6: divergent
    labels = [v.label for v in verifier.label(items)]
    assert labels == ["neutral", "divergent", "skipped", "divergent"]
    assert verifier.label(items[:1])[0].detail == {"branch_answer": "5"}


def test_a_custom_checker_needs_an_answer_on_every_query():
    settings = LabelSettings(answer_checker="tests.labels.checkers:even_length")
    AnswerVerifier(Words(), settings, {0: query(0, 1)})
    with pytest.raises(ValueError, match="query 'q1' has no \"answer\""):
        AnswerVerifier(Words(), settings, {0: query(0, 1), 1: query(1)})


def test_exact_compares_steps_up_to_the_delimiter():
    settings = LabelSettings(verifier="exact", continuation_tokens=4)
    verifier = make_verifier(Words(), settings, {0: query(0)})
    assert isinstance(verifier, ExactVerifier) and verifier.stop == ("\n\n",)
    trace = Trace(0, [9], [1, 2, 3, 4, 8, 9, 9], "stop")  # " So the answer is\n\n next next"
    # " ans" + "wer is": the same text in other tokens, and what follows the delimiter does not count
    same = Branch(0, 2, 3, 11, [Words.WORDS.index("wer"), 4, 8, 10], "stop")
    reworded = Branch(0, 2, 3, 10, [4, 8], "stop")  # " thus is" vs " answer is"
    assert [v.label for v in verifier.label([(same, trace), (reworded, trace)])] == ["neutral", "divergent"]
    assert cut_step("a b\n\nc", "\n\n") == "a b" and cut_step("a b", "\n\n") == "a b"
    assert cut_step("\n\nc", "\n\n") == ""
