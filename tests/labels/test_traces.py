"""Stage 0: the large model's traces through the engine, batched, equal its greedy decode alone."""

from __future__ import annotations

import pytest

from collab_decode.labels.queries import QueryError, read_queries
from collab_decode.labels.traces import decode_greedy, make_traces
from collab_decode.sampling import SamplingParams
from tests.labels.conftest import assert_blocks_free, chat_queries, pair_engine, write_queries


def test_traces_are_the_large_models_greedy_answers_batched_or_not(tmp_path, pair):
    queries = read_queries(write_queries(tmp_path / "q.jsonl", chat_queries(5)))
    batched = pair_engine(pair, batch_size=4)
    traces = make_traces(batched, queries, max_tokens=12)
    assert_blocks_free(batched)
    alone = pair_engine(pair, batch_size=1)
    for q, trace in zip(queries, traces):
        assert trace.query_index == q.index and trace.finish_reason in ("stop", "length")
        ref = alone.generate([trace.prompt_ids], SamplingParams(max_tokens=12, temperature=0.0), "large")[0]
        assert trace.response_ids == ref.token_ids


def test_a_given_response_is_used_as_is(tmp_path, engine):
    queries = read_queries(write_queries(tmp_path / "q.jsonl", [
        {"id": "a", "prompt": "Ann has 3 apples.", "response": " So the answer is 3."},
        {"id": "b", "prompt": "Ben has 4 pears."}]))
    given, decoded = make_traces(engine, queries, max_tokens=5)
    assert given.finish_reason == "given"
    assert given.response_ids == engine.tokenizer(" So the answer is 3.", add_special_tokens=False)["input_ids"]
    assert decoded.finish_reason in ("stop", "length") and 1 <= len(decoded.response_ids) <= 5


def test_prompts_too_long_for_the_context_are_refused(tmp_path, engine):
    long = " ".join(["apples"] * 600)
    queries = read_queries(write_queries(tmp_path / "q.jsonl", [{"id": "long", "prompt": long}]))
    with pytest.raises(QueryError, match="'long'.*no room for a response"):
        make_traces(engine, queries, max_tokens=5)
    queries = read_queries(write_queries(tmp_path / "q2.jsonl", [{"id": "r", "prompt": "Hi", "response": long}]))
    with pytest.raises(QueryError, match="'r': prompt \\+ response"):
        make_traces(engine, queries, max_tokens=5)


def test_decode_greedy_keeps_prompt_order_and_skips_empty_budgets(engine):
    prompts = [[5, 6, 7], [8, 9], [10]]
    out = decode_greedy(engine, prompts, [3, 0, 2])
    assert [len(o.token_ids) <= m for o, m in zip(out, [3, 0, 2])] == [True] * 3
    assert out[1].token_ids == [] and out[1].finish_reason == "length"
    alone = engine.generate([prompts[2]], SamplingParams(max_tokens=2, temperature=0.0), "large")[0]
    assert out[2].token_ids == alone.token_ids
    assert_blocks_free(engine)
