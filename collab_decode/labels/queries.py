"""A query set: JSONL, one query per line, checked line by line before any model loads.

    {"id": "q1", "prompt": "..."}                                      raw text, the tokenizer's special tokens
    {"id": "q2", "messages": [{"role": "user", "content": "..."}]}     the tokenizer's chat template
    optional on either: "answer" (string or number: the `answer` verifier's gold answer) and
    "response" (string: the reference trace, instead of one the large model writes)

read_queries(path) -> [Query]; a malformed line, an empty set or a duplicate id raises QueryError naming the
file and line. query_prompt_ids(tokenizer, query) tokenizes a query exactly as the server does a request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from collab_decode.serve.requests import chat_prompt_ids, text_prompt_ids

FIELDS = ("id", "prompt", "messages", "answer", "response")


class QueryError(ValueError):
    """A query file the pipeline cannot use; the message names the file and line."""


@dataclass(frozen=True)
class Query:
    index: int  # 0-based position in the file: the dataset's query_index
    id: str  # the query's own id (an integer id is kept as its decimal string)
    prompt: str | None  # raw text prompt, or None for a chat
    messages: tuple[tuple[str, str], ...] | None  # (role, content) per message, or None for a raw prompt
    answer: str | int | float | None  # gold answer for the `answer` verifier
    response: str | None  # a given reference trace (stage 0 then skips the large model)

    @property
    def has_answer(self) -> bool:
        return self.answer is not None


def read_queries(path: str | Path) -> list[Query]:
    """Every query of a JSONL file, in file order (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"query file {path} does not exist")
    queries: list[Query] = []
    seen: dict[str, int] = {}  # id -> line
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            query = _parse_line(line, len(queries), f"{path}:{line_no}")
            if query.id in seen:
                raise QueryError(f"{path}:{line_no}: duplicate id {query.id!r} (first on line {seen[query.id]})")
            seen[query.id] = line_no
            queries.append(query)
    if not queries:
        raise QueryError(f"{path} holds no queries (one JSON object per line is expected)")
    return queries


def _parse_line(line: str, index: int, where: str) -> Query:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise QueryError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise QueryError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise QueryError(f"{where}: unknown field(s) {unknown}; known: {', '.join(FIELDS)}")
    return Query(index=index, id=_id(obj, where), prompt=_prompt(obj, where), messages=_messages(obj, where),
                 answer=_answer(obj, where), response=_optional_str(obj, "response", where))


def _id(obj: dict, where: str) -> str:
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise QueryError(f"{where}: \"id\" must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _prompt(obj: dict, where: str) -> str | None:
    if ("prompt" in obj) == ("messages" in obj):
        raise QueryError(f"{where}: give exactly one of \"prompt\" and \"messages\"")
    prompt = _optional_str(obj, "prompt", where)
    if prompt == "":
        raise QueryError(f"{where}: \"prompt\" is empty")
    return prompt


def _messages(obj: dict, where: str) -> tuple[tuple[str, str], ...] | None:
    if "messages" not in obj:
        return None
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise QueryError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise QueryError(f"{where}: messages[{i}] must be an object with string \"role\" and \"content\"")
        out.append((m["role"], m["content"]))
    return tuple(out)


def _answer(obj: dict, where: str) -> str | int | float | None:
    value = obj.get("answer")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise QueryError(f"{where}: \"answer\" must be a string or a number, got {value!r}")
    return value


def _optional_str(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise QueryError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
    return value


def query_prompt_ids(tokenizer, query: Query) -> list[int]:
    """The prompt's token ids: a chat through the tokenizer's chat template, raw text with its special
    tokens (the server's tokenization of the same request)."""
    if query.messages is not None:
        try:
            return chat_prompt_ids(tokenizer, [{"role": r, "content": c} for r, c in query.messages])
        except ValueError as e:
            raise QueryError(f"query {query.id!r}: {e}") from None
    return text_prompt_ids(tokenizer, query.prompt)
