"""Stage 2: every mismatch becomes one branch, continued greedily by the large model through the engine
(batched), exactly as the large model alone would continue prefix + the small model's token."""

from __future__ import annotations

from collab_decode.labels.continuations import SKIPPED, Branch, continue_branches, find_branches
from collab_decode.labels.forcing import teacher_force
from collab_decode.labels.queries import read_queries
from collab_decode.labels.settings import LabelSettings
from collab_decode.labels.traces import make_traces
from collab_decode.labels.verifiers import ExactVerifier, Verifier
from collab_decode.sampling import SamplingParams
from tests.labels.conftest import assert_blocks_free, chat_queries, pair_engine, write_queries


def forced(engine, tmp_path, n=3, max_tokens=10):
    queries = read_queries(write_queries(tmp_path / "q.jsonl", chat_queries(n)))
    traces = make_traces(engine, queries, max_tokens)
    return queries, {t.query_index: t for t in traces}, teacher_force(engine, traces, 8, 64)


class SkipOdd(Verifier):
    """Continues 5 tokens, and only queries with an even index."""

    def can_label(self, trace):
        return trace.query_index % 2 == 0

    def budget(self, branch):
        return 5


def test_one_branch_per_mismatch_in_row_order(tmp_path, engine):
    _, _, rows = forced(engine, tmp_path)
    branches = find_branches(rows)
    assert len(branches) == int(rows.mismatch.sum()) > 0
    keys = [(b.query_index, b.position) for b in branches]
    assert keys == sorted(keys)
    for b in branches:
        i = [(int(q), int(p)) for q, p in zip(rows.query_index, rows.position)].index((b.query_index, b.position))
        assert (b.reference_token, b.small_token) == (int(rows.token_id[i]), int(rows.small_top1[i]))
        assert b.reference_token != b.small_token


def test_continuations_equal_the_large_model_alone_and_free_every_block(tmp_path, pair):
    engine = pair_engine(pair, batch_size=3)
    queries, traces, rows = forced(engine, tmp_path)
    verifier = SkipOdd(engine.tokenizer, LabelSettings(), {q.index: q for q in queries})
    branches = continue_branches(engine, traces, find_branches(rows), verifier)
    assert_blocks_free(engine)
    alone = pair_engine(pair, batch_size=1)
    for b in branches:
        if b.query_index % 2:
            assert b.finish_reason == SKIPPED and b.continuation_ids == []
            continue
        if b.small_token in engine.eos_token_ids:
            assert b.finish_reason == "stop" and b.continuation_ids == []
            continue
        ref = alone.generate([b.prompt_ids(traces[b.query_index])], SamplingParams(max_tokens=5, temperature=0.0),
                             "large")[0]
        assert (b.continuation_ids, b.finish_reason) == (ref.token_ids, ref.finish_reason)


def test_step_verifiers_stop_at_the_step_delimiter(tmp_path, engine):
    queries, traces, rows = forced(engine, tmp_path, n=2)
    settings = LabelSettings(verifier="exact", continuation_tokens=6, step_delimiter="e")
    verifier = ExactVerifier(engine.tokenizer, settings, {q.index: q for q in queries})
    assert verifier.stop == ("e",)
    for b in continue_branches(engine, traces, find_branches(rows), verifier):
        assert len(b.continuation_ids) <= 6
        text = engine.tokenizer.decode(b.continuation_ids, skip_special_tokens=True)
        if b.finish_reason == "stop" and b.continuation_ids and b.continuation_ids[-1] not in engine.eos_token_ids:
            assert "e" in text  # stopped by the delimiter


def test_a_branch_prompt_is_prefix_plus_the_small_token():
    from collab_decode.labels.traces import Trace

    trace = Trace(0, [1, 2], [3, 4, 5, 6], "stop")
    assert Branch(0, 2, 5, 9).prompt_ids(trace) == [1, 2, 3, 4, 9]
