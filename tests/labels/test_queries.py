"""Query files: every malformed line is refused with its line number; chats use the chat template."""

from __future__ import annotations

import json

import pytest

from collab_decode.labels.queries import QueryError, query_prompt_ids, read_queries
from collab_decode.serve.requests import chat_prompt_ids
from tests.labels.conftest import write_queries


def test_reads_prompts_chats_answers_and_responses_in_order(tmp_path):
    path = write_queries(tmp_path / "q.jsonl", [
        {"id": "a", "prompt": "Hello"},
        {"id": 7, "messages": [{"role": "user", "content": "Hi"}], "answer": 42, "response": "The answer is 42."},
    ])
    path.write_text(path.read_text() + "\n   \n")  # blank lines are skipped
    a, b = read_queries(path)
    assert (a.index, a.id, a.prompt, a.messages, a.answer, a.response) == (0, "a", "Hello", None, None, None)
    assert (b.index, b.id, b.messages, b.answer, b.response) == (1, "7", (("user", "Hi"),), 42, "The answer is 42.")
    assert b.has_answer and not a.has_answer


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "x"}', '"id" must be'),
    ('{"id": "", "prompt": "x"}', '"id" must be'),
    ('{"id": true, "prompt": "x"}', '"id" must be'),
    ('{"id": "a"}', 'exactly one of "prompt" and "messages"'),
    ('{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}', "exactly one of"),
    ('{"id": "a", "prompt": ""}', '"prompt" is empty'),
    ('{"id": "a", "prompt": 3}', '"prompt" must be a string'),
    ('{"id": "a", "messages": []}', '"messages" must be a non-empty list'),
    ('{"id": "a", "messages": [{"role": "user"}]}', "messages[0] must be an object"),
    ('{"id": "a", "prompt": "x", "answer": [1]}', '"answer" must be a string or a number'),
    ('{"id": "a", "prompt": "x", "response": 5}', '"response" must be a string'),
    ('{"id": "a", "prompt": "x", "label": 1}', "unknown field(s) ['label']"),
])
def test_a_malformed_line_is_refused_with_its_line_number(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "ok", "prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(QueryError) as e:
        read_queries(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_empty_missing_and_duplicate(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(QueryError, match="holds no queries"):
        read_queries(empty)
    with pytest.raises(QueryError, match="does not exist"):
        read_queries(tmp_path / "missing.jsonl")
    dup = write_queries(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                                 {"id": "a", "prompt": "z"}])
    with pytest.raises(QueryError, match=r"dup.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        read_queries(dup)
    # an integer id and its string are the same id
    dup2 = tmp_path / "dup2.jsonl"
    dup2.write_text(json.dumps({"id": 1, "prompt": "x"}) + "\n" + json.dumps({"id": "1", "prompt": "y"}) + "\n")
    with pytest.raises(QueryError, match="duplicate id '1'"):
        read_queries(dup2)


def test_prompts_tokenize_as_the_server_does(tmp_path, engine):
    path = write_queries(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Ann has 3 apples."},
                                                {"id": "b", "messages": [{"role": "user", "content": "Hi"}]}])
    raw, chat = read_queries(path)
    tok = engine.tokenizer
    assert query_prompt_ids(tok, raw) == tok("Ann has 3 apples.", add_special_tokens=True)["input_ids"]
    assert query_prompt_ids(tok, chat) == chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    bad = write_queries(tmp_path / "bad.jsonl", [{"id": "c", "messages": [{"role": "robot", "content": "Hi"}]}])
    with pytest.raises(QueryError, match="query 'c'"):
        query_prompt_ids(tok, read_queries(bad)[0])
