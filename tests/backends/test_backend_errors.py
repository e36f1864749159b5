"""A backend that cannot run some sequences raises BackendError naming them: the engine ends exactly those
requests with the error (finish reason "error", blocks freed, backend state released) and every other
request of the batch goes on to the output it would have had (token-level and speculative decoding)."""

from __future__ import annotations

import pytest

from collab_decode.backends.base import BackendError
from collab_decode.sampling import SamplingParams
from tests.utils import make_engine, make_pair

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 23, 41], [7, 7, 30], [12, 40, 8, 19, 3], [33, 2]]


class FlakyBackend:
    """Wraps a backend; a forward whose batch holds a doomed sequence at or after its `after`-th large call
    raises BackendError naming only it (the rest of that batch must retry). `fail_once` ids fail one
    forward and recover; `doomed` ids fail for good."""

    def __init__(self, inner, doomed: dict[int, int], fail_once: dict[int, int] | None = None):
        self.inner = inner
        self.doomed = doomed  # seq_id -> number of its calls that succeed before it fails
        self.fail_once = dict(fail_once or {})
        self.calls: dict[int, int] = {}
        self.released: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        for chunk in batch.chunks:
            self.calls[chunk.seq_id] = self.calls.get(chunk.seq_id, 0) + 1
        errors = {c.seq_id: f"endpoint refused sequence {c.seq_id}" for c in batch.chunks
                  if self.calls[c.seq_id] > self.doomed.get(c.seq_id, 1 << 30)}
        for c in batch.chunks:
            if self.fail_once.get(c.seq_id) == self.calls[c.seq_id]:
                errors.setdefault(c.seq_id, "transient")
                del self.fail_once[c.seq_id]
        if errors:
            raise BackendError({k: v for k, v in errors.items() if v != "transient"} or {-1: "transient"})
        return self.inner.forward(batch)

    def release(self, seq_id):
        self.released.append(seq_id)
        self.inner.release(seq_id)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def _run(engine, policy: str):
    ids = [engine.add_request(p, GREEDY, policy) for p in PROMPTS]
    seqs = {i: engine.seqs[i] for i in ids}
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    return [seqs[i] for i in ids], outputs


@pytest.mark.parametrize("policy", ["large", "entropy:0.5", "speculative:3"])
def test_backend_error_fails_only_the_named_requests(pair, policy):
    reference, _ = _run(make_engine(*pair), policy)
    engine = make_engine(*pair)
    first = next(engine._ids)  # the ids this run's sequences will get: first + 1, first + 2, ...
    doomed, transient = first + 2, first + 3
    flaky = FlakyBackend(engine.backends["large"], doomed={doomed: 2}, fail_once={transient: 2})
    engine.backends["large"] = engine.runner.backends["large"] = flaky
    seqs, outputs = _run(engine, policy)
    failed = [o for o in outputs if o.finish_reason == "error"]
    assert [o.seq_id for o in failed] == [doomed] and failed[0].finished
    assert seqs[1].finish_reason == "error" and seqs[1].error == f"endpoint refused sequence {doomed}"
    assert seqs[1].output_ids == reference[1].output_ids[:len(seqs[1].output_ids)]
    for seq, ref in zip(seqs[:1] + seqs[2:], reference[:1] + reference[2:]):
        assert seq.finish_reason == "length" and seq.output_ids == ref.output_ids  # retried, not harmed
        assert seq.provenance == ref.provenance
    assert doomed in flaky.released and not flaky.fail_once  # the transient failure happened too
    assert all(kv.num_used_blocks == 0 for kv in engine.kv.values()) and not engine.seqs


def test_failed_request_reports_its_error_through_generate(pair):
    engine = make_engine(*pair)
    first = next(engine._ids)
    engine.backends["large"] = engine.runner.backends["large"] = FlakyBackend(engine.backends["large"],
                                                                              doomed={first + 1: 0})
    result, other = engine.generate(PROMPTS[:2], GREEDY, ["large", "small"])
    assert result.finish_reason == "error" and result.token_ids == [] and "refused" in result.error
    assert other.finish_reason == "length" and other.error is None
