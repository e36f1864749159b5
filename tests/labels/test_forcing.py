"""Stage 1: teacher forcing gives, at every response position, the small model's greedy proposal and the
router features; chunking and batching change nothing; every block comes back."""

from __future__ import annotations

import pytest
import torch

from collab_decode.labels.forcing import teacher_force
from collab_decode.labels.traces import Trace
from collab_decode.sampling import SamplingParams
from tests.labels.conftest import assert_blocks_free


def small_greedy_traces(engine, prompts, n=20):
    outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "small")
    return [Trace(i, p, o.token_ids, o.finish_reason) for i, (p, o) in enumerate(zip(prompts, outs))]


def test_fed_its_own_greedy_output_the_small_models_top1_is_that_output(engine):
    traces = small_greedy_traces(engine, [[5, 6, 7, 8], [9, 10]])
    rows = teacher_force(engine, traces, top_k=8, max_tokens_per_forward=64)
    assert_blocks_free(engine)
    assert len(rows.token_id) == sum(len(t.response_ids) for t in traces)
    assert not rows.mismatch.any()
    assert rows.query_index.tolist() == [0] * 20 + [1] * 20
    assert rows.position.tolist() == list(range(20)) * 2
    assert rows.small_top1.tolist() == traces[0].response_ids + traces[1].response_ids
    assert rows.features.shape == (40, 2 * 32 + 8) and rows.features.dtype == torch.float32
    assert torch.all(rows.top1_prob >= rows.top2_margin) and torch.all(rows.entropy >= 0)


def test_a_foreign_trace_has_mismatches_where_the_small_model_disagrees(engine):
    trace = Trace(3, [5, 6, 7], [11, 12, 13, 14, 15, 16], "given")
    rows = teacher_force(engine, [trace], top_k=4, max_tokens_per_forward=64)
    assert rows.token_id.tolist() == trace.response_ids
    for pos in range(len(trace.response_ids)):  # the small model's own greedy choice after each prefix
        prefix = trace.prompt_ids + trace.response_ids[:pos]
        expected = engine.generate([prefix], SamplingParams(max_tokens=1, temperature=0.0), "small")[0].token_ids[0]
        assert int(rows.small_top1[pos]) == expected
    assert rows.mismatch.tolist() == [int(a) != b for a, b in zip(rows.small_top1, trace.response_ids)]


def test_chunked_and_batched_forcing_equals_one_trace_at_a_time(engine):
    traces = small_greedy_traces(engine, [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]], n=30)
    traces.append(Trace(3, [16, 17], [], "given"))  # an empty response has no rows
    together = teacher_force(engine, traces, top_k=8, max_tokens_per_forward=10)  # traces split across forwards
    alone = [teacher_force(engine, [t], top_k=8, max_tokens_per_forward=1000) for t in traces]
    assert_blocks_free(engine)
    for name, column in together.columns().items():
        expected = torch.cat([getattr(a, name) for a in alone])
        assert column.shape == expected.shape, name
        torch.testing.assert_close(column, expected, rtol=1e-5, atol=1e-5)


def test_blocks_come_back_when_forcing_fails(engine, monkeypatch):
    traces = small_greedy_traces(engine, [[5, 6, 7]], n=10)
    small = engine.backends["small"]

    def boom(batch):
        raise RuntimeError("backend failed")

    monkeypatch.setattr(small, "forward", boom)
    with pytest.raises(RuntimeError, match="backend failed"):
        teacher_force(engine, traces, top_k=8, max_tokens_per_forward=4)
    assert_blocks_free(engine)
