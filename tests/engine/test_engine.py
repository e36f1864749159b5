"""Engine invariants on a tiny random-init pair: policies vs models alone, batched = unbatched, blocks freed."""

from __future__ import annotations

import json

import pytest
import torch

from collab_decode.sampling import SamplingParams
from tests.utils import make_engine

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 17, 42, 8], [100, 3], [7, 7, 7, 7, 7, 7, 7, 7, 9, 11, 13], [250, 251, 252, 1, 2, 3, 60]]


@pytest.fixture(scope="module")
def mid_entropy(pair):
    """A threshold that routes some tokens and sits far from the entropies the small model actually produces.

    Over the prompts and the small model's own greedy continuations, it is the midpoint of the widest gap
    between neighbouring entropy values in the middle half: a threshold equal (to float noise) to a real
    entropy would let batched and unbatched runs, whose logits differ in the last bits, route differently.
    """
    from transformers import AutoModelForCausalLM

    from collab_decode.routing import entropy

    model = AutoModelForCausalLM.from_pretrained(str(pair[0])).eval()
    with torch.no_grad():
        values = []
        for p in PROMPTS:
            ids = torch.tensor([p + hf_greedy(pair[0], p, GREEDY.max_tokens)])
            values += entropy(model(ids).logits[0]).tolist()
    values = sorted(values)
    middle = values[len(values) // 4: 3 * len(values) // 4]
    lo, hi = max(zip(middle, middle[1:]), key=lambda pair_: pair_[1] - pair_[0])
    return round((lo + hi) / 2, 6)


def hf_greedy(path, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_alone(engine, policy, sampling=GREEDY):
    return [engine.generate([p], sampling, policy)[0] for p in PROMPTS]


def check_all_free(engine):
    assert not engine.has_unfinished()
    for name, kv in engine.kv.items():
        assert kv.num_used_blocks == 0, f"{name} pool leaks {kv.num_used_blocks} blocks"


def test_small_policy_equals_small_model_alone(engine, pair):
    for prompt, result in zip(PROMPTS, run_alone(engine, "small")):
        assert result.token_ids == hf_greedy(pair[0], prompt, GREEDY.max_tokens)
        assert set(result.provenance) == {"small"}
    check_all_free(engine)


@pytest.mark.parametrize("policy", ["large", "speculative:1", "speculative:3", "speculative:5"])
def test_lossless_policies_equal_large_model_alone(engine, pair, policy):
    for prompt, result in zip(PROMPTS, run_alone(engine, policy)):
        assert result.token_ids == hf_greedy(pair[1], prompt, GREEDY.max_tokens)
    check_all_free(engine)


def test_large_policy_provenance_and_stats(engine):
    result = engine.generate([PROMPTS[0]], GREEDY, "large")[0]
    assert result.provenance == ["large"] * GREEDY.max_tokens
    assert result.stats["large_share"] == 1.0


@pytest.mark.parametrize("policy", ["small", "large", "random:0.3", "entropy:MID", "confidence:0.0035",
                                    "step-entropy:MID", "speculative:3"])
def test_batched_equals_unbatched(engine, policy, mid_entropy):
    policy = policy.replace("MID", str(mid_entropy))
    alone = run_alone(engine, policy)
    batched = engine.generate(PROMPTS, GREEDY, policy)
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids
        assert a.provenance == b.provenance
    check_all_free(engine)


def test_entropy_routes_some_tokens_and_stats_add_up(engine, mid_entropy):
    result = engine.generate(PROMPTS, GREEDY, f"entropy:{mid_entropy}")
    large = sum(r.stats["large_tokens"] for r in result)
    total = sum(len(r.token_ids) for r in result)
    assert 0 < large < total  # the threshold sits inside this tiny model's entropy range
    for r in result:
        assert r.stats["large_tokens"] == r.provenance.count("large")
        assert r.stats["small_tokens"] + r.stats["large_tokens"] == len(r.token_ids)


def test_seeded_sampling_is_reproducible(engine):
    sampling = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    first = engine.generate(PROMPTS, sampling, "random:0.5")
    again = engine.generate(PROMPTS[::-1], sampling, "random:0.5")[::-1]
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    other = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert [r.token_ids for r in first] != [r.token_ids for r in other]


def test_abort_and_preemption_free_every_block(pair):
    # pools of 12 blocks of 4 tokens cannot hold 4 sequences of ~35 tokens: the scheduler must preempt.
    # K+V bytes per token: small 2 layers x 2 kv heads x 8 dims, large 3 x 2 x 16, float32
    engine = make_engine(*pair, block_size=4, small_kv_bytes=48 * 2 * 2 * 2 * 8 * 4,
                         large_kv_bytes=48 * 2 * 3 * 2 * 16 * 4)
    assert engine.kv["small"].pool.num_blocks == engine.kv["large"].pool.num_blocks == 12
    ids = [engine.add_request(p, GREEDY, policy) for p, policy in
           zip(PROMPTS, ["small", "random:0.5", "speculative:2", "large"])]
    finished, queued = {}, {}
    for step in range(400):
        for out in engine.step():
            if out.finished:
                finished[out.seq_id] = out.seq
        for seq_id, seq in engine.seqs.items():  # each one's queue time, once it was first admitted
            if seq.queue_time_s is not None:
                queued.setdefault(seq_id, seq.queue_time_s)
        if step == 5:
            engine.abort(ids[1])
        if not engine.has_unfinished():
            break
    assert set(finished) == {ids[0], ids[2], ids[3]}
    assert sum(s.stats.num_preemptions for s in finished.values()) > 0
    # the queue time is the wait before the first admission (/metrics), not moved by a preemption's readmission
    assert all(s.queue_time_s == queued[i] is not None for i, s in finished.items())
    check_all_free(engine)
    # preempted sequences recompute to the same greedy output as an unconstrained engine
    reference = make_engine(*pair)
    for i, policy in zip([0, 2, 3], ["small", "speculative:2", "large"]):
        assert finished[ids[i]].output_ids == reference.generate([PROMPTS[i]], GREEDY, policy)[0].token_ids


def test_bad_requests_are_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request([10**6], GREEDY)
    with pytest.raises(ValueError, match="unknown routing policy"):
        engine.add_request([1, 2], GREEDY, "magic:3")
    with pytest.raises(ValueError, match="context length"):
        engine.add_request([1, 2], SamplingParams(max_tokens=10**6))
    check_all_free(engine)


def test_caller_chosen_request_ids(engine):
    """An engine process takes its client's ids (serve/engine_core.py): one in use is refused, and the engine's
    own numbering steps over the ids callers chose."""
    chosen = engine.add_request(PROMPTS[0], GREEDY, seq_id=engine.add_request(PROMPTS[1], GREEDY) + 1)
    with pytest.raises(ValueError, match="in use"):
        engine.add_request(PROMPTS[2], GREEDY, seq_id=chosen)
    numbered = engine.add_request(PROMPTS[2], GREEDY)
    assert numbered != chosen and len({chosen, numbered, *engine.seqs}) == 3
    while engine.has_unfinished():
        engine.step()
    check_all_free(engine)


def test_compiled_decode_path_matches_eager(pair):
    """--compile: decode-only steps run through torch.compile; greedy output is unchanged."""
    compiled = make_engine(pair[0], compile=True)
    eager = make_engine(pair[0])
    assert [r.token_ids for r in compiled.generate(PROMPTS, GREEDY)] == \
        [r.token_ids for r in eager.generate(PROMPTS, GREEDY)]


def test_preemption_only_takes_blocks_from_the_pool_that_is_short(pair):
    """A large-pool shortage must not preempt a sequence that holds no large-model blocks."""
    # large pool: 12 blocks of 4 tokens; the small pool is ample
    engine = make_engine(*pair, block_size=4, large_kv_bytes=48 * 2 * 3 * 2 * 16 * 4)
    larges = [engine.add_request(p, GREEDY, "large") for p in PROMPTS[:2]]
    small_only = engine.add_request(PROMPTS[2], GREEDY, "small")  # the youngest, but holds no large blocks
    seqs = {i: engine.seqs[i] for i in [small_only, *larges]}
    while engine.has_unfinished():
        engine.step()
    assert seqs[small_only].stats.num_preemptions == 0
    assert sum(seqs[i].stats.num_preemptions for i in larges) > 0
    check_all_free(engine)


def _run_to_end(engine, prompt, sampling, policy):
    seq_id = engine.add_request(prompt, sampling, policy)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.seq_id == seq_id:
                return out.seq


def test_speculative_logprobs_are_the_large_models(engine):
    """Every committed token of speculative:k is the large model's decision: its logprob and top-n alternatives
    are the large model's, the same as the `large` policy reports (drafts verified in one chunk vs one by one)."""
    sampling = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.0, ignore_eos=True, logprobs=3)
    large = _run_to_end(engine, PROMPTS[1], sampling, "large")
    spec = _run_to_end(engine, PROMPTS[1], sampling, "speculative:3")
    assert spec.output_ids == large.output_ids
    assert len(spec.logprobs) == len(spec.top_logprobs) == len(large.top_logprobs) == GREEDY.max_tokens
    assert max(abs(a - b) for a, b in zip(spec.logprobs, large.logprobs)) < 1e-4
    for mine, ref in zip(spec.top_logprobs, large.top_logprobs):
        assert [t for t, _ in mine] == [t for t, _ in ref]
        assert max(abs(a - b) for (_, a), (_, b) in zip(mine, ref)) < 1e-4
    check_all_free(engine)


@pytest.mark.parametrize("policy", ["small", "entropy", "speculative:3"])
def test_long_prompts_prefill_in_chunks_within_the_token_budget(engine, pair, policy, mid_entropy):
    """A per-step budget of 4 small-model tokens against prompts of up to 11: no small forward runs more
    (speculative sequences too, until their chunk reaches the end and they draft), and the outputs equal
    those of an engine that prefills each prompt at once. The large model's catch-up is not budgeted."""
    from collab_decode.engine.scheduler import SchedulerConfig

    policy = f"entropy:{mid_entropy}" if policy == "entropy" else policy
    chunked = make_engine(*pair, scheduler=SchedulerConfig(max_num_batched_tokens=4))
    small, sizes = chunked.backends["small"], []
    forward = small.forward

    def counting_forward(batch):  # the real forward, with each call's token count written down
        sizes.append(sum(len(c.token_ids) for c in batch.chunks))
        return forward(batch)

    small.forward = counting_forward
    results = run_alone(chunked, policy)
    assert max(sizes) == 4
    assert [r.token_ids for r in results] == [r.token_ids for r in run_alone(engine, policy)]
    check_all_free(chunked)


def test_long_chunks_take_chunk_threads_at_low_load(pair):
    """chunk_threads: a large-model forward of >= 8 new tokens (a prompt, a catch-up) runs on that many torch
    threads while at most chunk_threads_max_batch sequences run; the small model's forwards, decode steps, and
    every forward above that batch keep the process's threads, which are restored after each chunk. Greedy
    outputs do not change."""
    from collab_decode.engine.runner import CHUNK_MIN_TOKENS

    seen = []  # (model, new tokens, torch threads inside the forward)

    def record(engine):
        for name, backend in engine.backends.items():
            def forward(batch, name=name, inner=backend.forward):
                seen.append((name, sum(len(c.token_ids) for c in batch.chunks), torch.get_num_threads()))
                return inner(batch)
            backend.forward = forward
        return engine

    assert torch.get_num_threads() == 1  # tests/conftest.py
    threaded = record(make_engine(*pair, chunk_threads=2, chunk_threads_max_batch=2))
    prompts = [[1 + (7 * i + j) % 60 for j in range(12)] for i in range(3)]
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = threaded.generate(prompts[:1], sampling, "entropy:0.5")
    assert torch.get_num_threads() == 1
    chunks = [(m, n, t) for m, n, t in seen if n >= CHUNK_MIN_TOKENS]
    assert {m for m, _, _ in chunks} == {"small", "large"}  # both prompts; the large one's first call
    assert all(t == (2 if m == "large" else 1) for m, _, t in chunks)
    assert all(t == 1 for _, n, t in seen if n < CHUNK_MIN_TOKENS)
    seen.clear()
    busy = threaded.generate(prompts, sampling, "entropy:0.5")  # 3 running > chunk_threads_max_batch
    assert [n for _, n, _ in seen if n >= CHUNK_MIN_TOKENS] and all(t == 1 for _, _, t in seen)
    plain = make_engine(*pair)
    assert [g.token_ids for g in alone + busy] == [
        g.token_ids for g in plain.generate(prompts[:1], sampling, "entropy:0.5") + plain.generate(
            prompts, sampling, "entropy:0.5")]


def test_routed_tokens_wait_to_share_a_large_call(pair):
    """large_wait_steps: at a batch of at least large_wait_min_batch, a routed token waits up to that many steps
    for others, so fewer large-model forwards write the same tokens (greedy and seeded sampling alike); no
    token waits below that batch or where the large model runs anyway (a `large` sequence in the batch)."""
    wait = 3
    waiting, plain = make_engine(*pair, large_wait_steps=wait, large_wait_min_batch=3), make_engine(*pair)
    # random routing draws from a generator seeded by the request's seed: distinct seeds route at different steps
    for temperature in (0.0, 1.0):
        samplings = [SamplingParams(max_tokens=24, temperature=temperature, seed=i, ignore_eos=True)
                     for i in range(len(PROMPTS))]
        calls = {e: e.runner.num_forwards["large"] for e in (waiting, plain)}
        ids = [waiting.add_request(p, s, "random:0.2") for p, s in zip(PROMPTS, samplings)]
        done, waited = {}, 0
        while waiting.has_unfinished():
            done |= {out.seq_id: out.seq for out in waiting.step() if out.finished}
            held = [s for s in waiting.seqs.values() if s.waiting_since is not None]
            assert all(waiting.num_steps - s.waiting_since < wait for s in held)  # runs by its wait-th step
            waited = max([waited] + [waiting.num_steps - s.waiting_since + 1 for s in held])
        expected = plain.generate(PROMPTS, samplings, "random:0.2")
        assert [done[i].output_ids for i in ids] == [g.token_ids for g in expected]
        assert [done[i].provenance for i in ids] == [g.provenance for g in expected]
        assert waited == wait  # some token waited its whole allowance
        assert sum(done[i].stats.num_large_waits for i in ids) > 0
        calls = {e: e.runner.num_forwards["large"] - n for e, n in calls.items()}
        assert calls[waiting] < calls[plain]  # calls shared
        check_all_free(waiting)
    # two sequences are fewer than large_wait_min_batch; a `large` sequence runs the large model every step
    samplings = [SamplingParams(max_tokens=24, temperature=0.0, seed=i, ignore_eos=True) for i in range(4)]
    for n, policies in [(2, ["random:0.2"] * 2), (4, ["large"] + ["random:0.2"] * 3)]:
        results = waiting.generate(PROMPTS[:n], samplings[:n], policies)
        expected = plain.generate(PROMPTS[:n], samplings[:n], policies)
        assert [r.token_ids for r in results] == [r.token_ids for r in expected]
        assert all(r.stats["large_waits"] == 0 for r in results)
    check_all_free(waiting)


@pytest.mark.parametrize("field, value", [("block_size", 0), ("chunk_threads", -1), ("chunk_threads_max_batch", 0),
                                          ("large_wait_steps", -1), ("large_wait_min_batch", 0)])
def test_engine_config_refuses_values_out_of_range(field, value):
    from collab_decode.engine.config import EngineConfig
    from collab_decode.engine.scheduler import SchedulerConfig

    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
    with pytest.raises(ValueError, match="no routed token would ever wait"):  # a batch never that large
        EngineConfig(large_wait_steps=2, large_wait_min_batch=9, scheduler=SchedulerConfig(max_num_seqs=8))
    EngineConfig(large_wait_min_batch=9, scheduler=SchedulerConfig(max_num_seqs=8))  # no waits: nothing to refuse


def test_waiting_tokens_survive_preemption(pair, mid_entropy):
    """Pools too small for four sequences: waiting sequences get preempted and recompute; under a router whose
    decision is a function of the context (entropy, greedy) the outputs still equal an unconstrained engine's
    without waiting, and every block comes back."""
    engine = make_engine(*pair, block_size=4, small_kv_bytes=48 * 2 * 2 * 2 * 8 * 4,
                         large_kv_bytes=48 * 2 * 3 * 2 * 16 * 4, large_wait_steps=3, large_wait_min_batch=2)
    policy = f"entropy:{mid_entropy}"
    results = engine.generate(PROMPTS, GREEDY, policy)
    assert sum(r.stats["preemptions"] for r in results) > 0 and sum(r.stats["large_waits"] for r in results) > 0
    expected = make_engine(*pair).generate(PROMPTS, GREEDY, policy)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert [r.provenance for r in results] == [r.provenance for r in expected]
    check_all_free(engine)


def test_the_usual_decode_step_commits_what_the_general_step_would(pair, mid_entropy, monkeypatch, tmp_path):
    """Engine.decode, the path of the usual step (every running sequence decoding one token), writes what the
    general step writes: the token-level policies batched, and each policy alone, with greedy and seeded sampling,
    logprobs, prompt logprobs and a stop string; gated routers (confidence, a neural router with a gate) at a
    threshold that splits this pair's positions, so sure steps commit at once and the rest are routed. Every
    block comes back. Runs once as served and once with the usual step taken away (the general rule every step)."""
    import math

    from collab_decode.engine.engine import Engine
    from collab_decode.engine.scheduler import Scheduler
    from collab_decode.routing.neural import RouterMLP, save_router

    engine = make_engine(*pair)
    greedy_logprobs = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    chosen = [lp for r in engine.generate(PROMPTS, greedy_logprobs, "small") for lp in r.logprobs]
    gate = round(math.exp(sorted(chosen)[len(chosen) // 2]), 6)  # the median top-1 probability (greedy: chosen)
    torch.manual_seed(0)
    hidden_size = engine.backends["small"].hidden_size
    save_router(tmp_path / "router", RouterMLP(hidden_size, top_k=8, width=16),
                {"hidden_size": hidden_size, "top_k": 8, "width": 16, "num_layers": 2, "threshold": 0.5, "gate": gate})
    policies = ["small", "large", f"entropy:{mid_entropy}", f"confidence:{gate}", "neural", "random:0.3",
                f"step-entropy:{mid_entropy}"]
    samplings = [GREEDY, SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True), greedy_logprobs,
                 SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=2),
                 SamplingParams(max_tokens=24, temperature=0.0, stop=["e"])]
    decode_steps = []
    real_decode = Engine.decode
    monkeypatch.setattr(Engine, "decode", lambda self, seqs: decode_steps.append(len(seqs)) or real_decode(self, seqs))

    def finished(engine, requests) -> list:
        """Each request's sequence once finished (what a client can read of it), in request order."""
        ids = [engine.add_request(prompt, sampling, policy) for prompt, sampling, policy in requests]
        seqs = {}
        while engine.has_unfinished():
            seqs.update((out.seq_id, out.seq) for out in engine.step() if out.finished)
        return [(s.output_ids, s.provenance, s.finish_reason, s.logprobs, s.top_logprobs, s.prompt_logprobs,
                 s.output_text, s.stats.as_dict()) for s in map(seqs.get, ids)]

    def run() -> list:
        engine = make_engine(*pair, routers={"r": tmp_path / "router"})
        batched = policies[:1] + policies[2:6]  # (a step the large model owns takes the general rule: `large`'s)
        results = finished(engine, [(PROMPTS[i % 4], samplings[i % 5], batched[i % 5]) for i in range(8)])
        for i, policy in enumerate(policies):
            results += finished(engine, [(PROMPTS[i % 4], samplings[i % 5], policy)])
        check_all_free(engine)
        return results

    served = run()
    assert len(decode_steps) > 100 and max(decode_steps) > 1  # the usual step ran, alone and batched
    assert {w for _, provenance, *_ in served for w in provenance} == {"small", "large"}
    assert any(prompt_logprobs for *_, prompt_logprobs, _, _ in served)
    monkeypatch.setattr(Scheduler, "decodes", lambda self: None)
    decode_steps.clear()
    assert run() == served
    assert not decode_steps


def test_the_work_on_the_host_writes_what_its_torch_ops_write(pair, mid_entropy, monkeypatch, tmp_path):
    """The engine with greedy batches sampled, entropies taken and a neural router's few uncertain rows scored by
    collab_decode/_hostops.c (as served on a CPU) and with the torch ops (another device, larger batches, or no C
    compiler at install): the same tokens, writers, logprobs and finish reasons for every policy that reads the
    sampler's tokens, row maxima or top-1 probabilities (gated routers, a neural router, speculative verification),
    batched and alone."""
    from collab_decode import sampling
    from collab_decode.routing import neural
    from collab_decode.routing import policies as routing_policies
    from collab_decode.routing.neural import RouterMLP, save_router

    assert sampling._hostops is not None, "collab_decode._hostops was not built (make setup builds it)"
    torch.manual_seed(0)
    hidden_size = json.loads((pair[0] / "config.json").read_text())["hidden_size"]
    save_router(tmp_path / "router", RouterMLP(hidden_size, top_k=8, width=16),
                {"hidden_size": hidden_size, "top_k": 8, "width": 16, "num_layers": 2, "threshold": 0.5, "gate": 0.6})
    policies = ["small", "large", f"entropy:{mid_entropy}", "confidence:0.6", "neural", "random:0.3",
                f"step-entropy:{mid_entropy}", "speculative:3"]
    greedy_logprobs = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)

    def run() -> list:
        engine = make_engine(*pair, routers={"r": tmp_path / "router"})
        out = []
        for sampling_params in (GREEDY, greedy_logprobs):
            for policy in policies:
                out += engine.generate(PROMPTS, sampling_params, policy)
                out += engine.generate(PROMPTS[:1], sampling_params, policy)
        check_all_free(engine)
        return [(r.token_ids, r.provenance, r.logprobs, r.finish_reason, r.stats) for r in out]

    on_host = run()
    assert {w for _, provenance, *_ in on_host for w in provenance} == {"small", "large"}
    monkeypatch.setattr(sampling, "_hostops", None)
    monkeypatch.setattr(neural, "HOST_MAX_ROWS", 0)
    monkeypatch.setattr(routing_policies, "HOST_ENTROPY_MAX_ROWS", 0)
    assert run() == on_host


def test_the_demo_router_on_the_host_decides_what_its_torch_ops_decide(monkeypatch):
    """The shipped router (prompt lookup, 100 top logits, a gate) on the demo pair, requests one at a time as at
    batch 1 and batched: the same tokens and writers with its MLP and features computed on the host and with the
    torch ops."""
    from collab_decode.bench.workload import demo_workload
    from collab_decode.demo import checkpoint_dir
    from collab_decode.pairs import pair_routers
    from collab_decode.routing import neural

    engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"), routers=pair_routers("demo"))
    workload = demo_workload(engine.tokenizer, 10)
    prompts = [workload.request(i) for i in range(len(workload))]

    def run() -> list:
        results = [engine.generate([p], workload.sampling(), "neural:0.7")[0] for p in prompts[:6]]
        results += engine.generate(prompts, workload.sampling(), "neural")
        return [(r.token_ids, r.provenance) for r in results]

    on_host = run()
    assert sum(provenance.count("large") for _, provenance in on_host) > 10
    monkeypatch.setattr(neural, "HOST_MAX_ROWS", 0)
    assert run() == on_host
