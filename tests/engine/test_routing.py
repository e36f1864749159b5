"""Routing policies: parsing, the neural router's feature path, step ownership, speculative sampling."""

from __future__ import annotations

import pytest
import torch

from collab_decode.routing import parse_routing
from collab_decode.routing.neural import RouterMLP, save_router
from collab_decode.sampling import SamplingParams
from tests.utils import make_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("spec, message", [
    ("entropy", "needs an argument"), ("entropy:abc", "bad argument"), ("entropy:-1", "t >= 0"),
    ("random:1.5", "0 <= p <= 1"), ("confidence:2", "0 <= t <= 1"), ("speculative:0", "1 <= k"),
    ("speculative:2.5", "whole number"), ("entropy:nan", "finite"), ("entropy:inf", "finite"),
    ("large:3", "takes no argument"), ("oracle:1", "unknown routing policy"), ("", "non-empty"),
    ("neural:/does/not/exist", "not a router name"), ({"policy": "neural", "path": "/etc"}, "use \"router\""),
    ({"policy": "entropy", "threshold": "0.5"}, "finite number"), ({"policy": "entropy", "k": 3}, "takes no k"),
])
def test_bad_policy_strings_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_routing(spec)


@pytest.mark.parametrize("text, obj", [
    ("entropy:0.6", {"policy": "entropy", "threshold": 0.6}), ("speculative:4", {"policy": "speculative", "k": 4}),
    ("neural:demo:0.25", {"policy": "neural", "router": "demo", "threshold": 0.25}), ("large", {"policy": "large"}),
    ("step-entropy:1.5", {"policy": "step-entropy", "threshold": 1.5}), ("neural:0.5", {"policy": "neural",
                                                                                     "threshold": 0.5}),
])
def test_string_and_object_forms_parse_to_the_same_spec(text, obj):
    spec = parse_routing(text)
    assert spec == parse_routing(obj) and parse_routing(str(spec)) == spec


def test_neural_router_sees_hidden_embedding_and_top_logits(engine, pair, tmp_path):
    """The policy's decisions equal the router applied to features computed independently with transformers:
    [last hidden state, embedding of the proposed token, the 8 largest logits in descending order]."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hidden_size = engine.backends["small"].hidden_size
    router = RouterMLP(hidden_size, top_k=8, width=16)
    save_router(tmp_path / "router", router, {"hidden_size": hidden_size, "top_k": 8, "width": 16, "num_layers": 2,
                                               "threshold": 0.5})
    prompt = [5, 17, 42, 8, 100, 3]
    # threshold = the median score along the greedy path, so some tokens route and some do not
    hf = AutoModelForCausalLM.from_pretrained(str(pair[0])).eval()
    small_only = engine.generate([prompt], GREEDY, "small")[0].token_ids
    with torch.no_grad():
        out = hf(torch.tensor([prompt + small_only]), output_hidden_states=True)
        hidden, logits = out.hidden_states[-1][0], out.logits[0]
        positions = range(len(prompt) - 1, len(prompt) + len(small_only) - 1)
        proposed = torch.tensor(small_only)
        top = logits[list(positions)].sort(dim=-1, descending=True).values[:, :8]
        feats = torch.cat([hidden[list(positions)], hf.get_input_embeddings()(proposed), top], dim=-1)
        scores = torch.sigmoid(router(feats))
    threshold = float(scores.median())
    routed = make_engine(*pair, routers={"mine": tmp_path / "router"})
    result = routed.generate([prompt], GREEDY, f"neural:mine:{threshold}")[0]
    expected_first_route = int((scores > threshold).nonzero()[0])  # the path is the small model's until then
    first_large = result.provenance.index("large")
    assert first_large == expected_first_route
    assert result.provenance[:first_large] == ["small"] * first_large


def test_neural_router_for_another_pair_is_refused(pair, tmp_path):
    save_router(tmp_path / "r", RouterMLP(7, top_k=4, width=8), {"hidden_size": 7, "top_k": 4, "width": 8,
                                                                  "num_layers": 2})
    with pytest.raises(ValueError, match="trained for another pair"):
        make_engine(*pair, routers={"r": tmp_path / "r"})


def test_neural_routers_are_named_and_unknown_names_refused(engine):
    with pytest.raises(ValueError, match="no neural router is loaded"):
        engine.add_request([1, 2, 3], GREEDY, "neural")


def test_sequences_sharing_a_spec_share_one_router_asked_once_per_step(pair):
    """64 sequences routed by "entropy:0.5" (a new string object each): one router object, one decide() call
    per step, whatever the batch size; a different spec gets its own router."""
    from collab_decode.routing.policies import EntropyRoute

    engine = make_engine(*pair)
    calls = []
    real = EntropyRoute.decide

    def counting_decide(self, inputs):
        calls.append(len(inputs.states))
        return real(self, inputs)

    EntropyRoute.decide = counting_decide
    try:
        ids = [engine.add_request([5 + i % 50, 17, 42], GREEDY, "entropy:" + "0.5") for i in range(64)]
        assert len({id(engine.seqs[i].router) for i in ids}) == 1
        num_steps = 0
        while engine.has_unfinished():
            engine.step()
            num_steps += 1
    finally:
        EntropyRoute.decide = real
    assert len(calls) == num_steps and set(calls) == {64}
    assert engine.router_for(parse_routing("entropy:0.5")) is not engine.router_for(parse_routing("entropy:0.6"))


def test_step_entropy_extremes_equal_the_models_alone(engine):
    prompt = [9, 8, 7, 6]
    assert engine.generate([prompt], GREEDY, "step-entropy:0")[0].token_ids == \
        engine.generate([prompt], GREEDY, "large")[0].token_ids
    assert engine.generate([prompt], GREEDY, "step-entropy:1000")[0].token_ids == \
        engine.generate([prompt], GREEDY, "small")[0].token_ids


def test_step_entropy_gives_each_step_one_owner():
    """On the demo pair (whose outputs have '\\n\\n'-delimited steps), provenance is constant inside a step."""
    from collab_decode.demo import checkpoint_dir
    from collab_decode.demo.task import problems
    from collab_decode.demo.tokenizer import chat_prompt

    engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"))
    prompts = [chat_prompt(p.question) for p in problems("heldout", 3)]
    tok = engine.tokenizer
    owners_per_threshold = []
    for threshold in (0.3, 0.7, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 2.0):
        results = engine.generate(prompts, SamplingParams(max_tokens=120, temperature=0.0),
                                  f"step-entropy:{threshold}")
        owners = set()
        for r in results:
            text, step_owner = "", None
            for token, source in zip(r.token_ids, r.provenance):
                step_owner = step_owner or source
                owners.add(source)
                assert source == step_owner, f"a step mixes owners: {text!r}"
                text += tok.decode([token], skip_special_tokens=True)
                if text.endswith("\n\n"):
                    step_owner = None
        owners_per_threshold.append(owners)
    assert {"small", "large"} in owners_per_threshold  # some threshold splits steps between the models


def test_speculative_sampling_keeps_the_large_models_distribution(engine, pair):
    """First output token under speculative:1 (a small draft, accepted or resampled) ~ the large model's top-5."""
    from transformers import AutoModelForCausalLM

    temperature = 0.1  # sharpens the tiny random models' near-uniform distributions so p and q differ
    sampling = [SamplingParams(max_tokens=2, temperature=temperature, top_k=5, seed=s, ignore_eos=True)
                for s in range(3000)]
    large = AutoModelForCausalLM.from_pretrained(str(pair[1])).eval()
    small = AutoModelForCausalLM.from_pretrained(str(pair[0])).eval()

    def top5(prompt):  # the large model's top-5 (renormalised) and the small model's mass on the same tokens
        with torch.no_grad():
            p = torch.softmax(large(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
            q = torch.softmax(small(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        top = p.topk(5)
        return top.indices, top.values / top.values.sum(), q[top.indices] / q[top.indices].sum()

    # the prompt (of a few fixed ones) where the draft distribution differs most: acceptance must matter
    candidates = [[11, 22, 33, 44], [5, 6, 7], [100, 200, 300], [1, 2, 3, 4, 5], [300, 12, 40], [77, 78]]
    prompt = max(candidates, key=lambda c: float((top5(c)[1] - top5(c)[2]).abs().max()))
    top_indices, target, q_top = top5(prompt)
    assert (target - q_top).abs().max() > 0.1
    results = engine.generate([prompt] * len(sampling), sampling, "speculative:1")
    firsts = torch.tensor([r.token_ids[0] for r in results])
    counts = torch.stack([(firsts == t).sum() for t in top_indices]).float()
    assert counts.sum() == len(sampling)  # nothing outside the large model's top-5
    expected = target * len(sampling)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts, expected)  # 4 dof: p = 0.0004
    assert any(r.provenance[0] == "small" for r in results) and any(r.provenance[0] == "large" for r in results)


def test_step_boundaries_do_not_depend_on_stop_string_hold_back():
    """Stop strings hold streamed text back; step ends must still be seen where they happen."""
    from collab_decode.demo import checkpoint_dir
    from collab_decode.demo.task import problems
    from collab_decode.demo.tokenizer import chat_prompt

    engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"))
    prompts = [chat_prompt(p.question) for p in problems("heldout", 3)]
    for threshold in (0.6, 1.0):
        plain = engine.generate(prompts, SamplingParams(max_tokens=100, temperature=0.0), f"step-entropy:{threshold}")
        held = engine.generate(prompts, SamplingParams(max_tokens=100, temperature=0.0, stop=("ZZZZZZZZZZ",)),
                               f"step-entropy:{threshold}")
        assert [r.provenance for r in plain] == [r.provenance for r in held]


def test_routing_sits_below_the_engine():
    """Importing routing (and building every router) loads nothing from collab_decode.engine."""
    import subprocess
    import sys

    code = ("import sys, collab_decode.routing as r, collab_decode.routing.neural\n"
            "[r.build_router(r.parse_routing(s)) for s in ('small', 'large', 'random:0.1', 'entropy:1', "
            "'confidence:0.5', 'step-entropy:1', 'speculative:2')]\n"
            "print(sorted(m for m in sys.modules if m.startswith('collab_decode.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def recorded_decides(monkeypatch, cls) -> list[list[float]]:
    """Each call of cls.decide from now on records its rows' top-1 probabilities in the list returned."""
    calls: list[list[float]] = []
    real = cls.decide

    def recording_decide(self, inputs):
        calls.append(inputs.top1_probs())
        return real(self, inputs)

    monkeypatch.setattr(cls, "decide", recording_decide)
    return calls


@pytest.mark.parametrize("num_prompts, with_small", [(1, False), (4, False), (4, True)])
def test_a_gated_router_is_not_asked_where_every_row_reaches_its_gate(pair, monkeypatch, num_prompts, with_small):
    """confidence:t routes no position whose top-1 probability reaches t (its gate): a token step where every row
    does is not routed and the router is not asked. Tokens and writers equal those of the same router asked at
    every step (its gate taken away), alone and batched, and batched with `small` requests (which never route:
    their rows do not keep the router asked)."""
    from collab_decode.routing.policies import ConfidenceRoute

    calls = recorded_decides(monkeypatch, ConfidenceRoute)
    prompts = [[5 + i, 17, 42, 9] for i in range(num_prompts)]
    make_engine(*pair).generate(prompts[:1], GREEDY, "confidence:1.0")  # asked at every step: this pair's top-1s
    t = round(float(torch.tensor([p for top1 in calls for p in top1]).median()), 6)
    policy = f"confidence:{t}"
    policies = [policy if i % 2 == 0 or not with_small else "small" for i in range(num_prompts)]
    runs = {}
    for gated in (True, False):
        engine = make_engine(*pair)
        calls.clear()
        if not gated:
            engine.router_for(parse_routing(policy)).gate = None
        results = engine.generate(prompts, GREEDY, policies)
        runs[gated] = ([(r.token_ids, r.provenance) for r in results], list(calls))
    (outputs, gated_calls), (ungated_outputs, ungated_calls) = runs[True], runs[False]
    assert outputs == ungated_outputs
    writers = {source for _, provenance in outputs for source in provenance}
    assert writers == {"small", "large"}, writers  # the threshold splits this pair's positions
    assert all(any(p < t for p in top1) for top1 in gated_calls)  # asked only where some row may be routed
    assert any(all(p >= t for p in top1) for top1 in ungated_calls)  # the steps the gate spared
    assert len(ungated_calls) > len(gated_calls) > 0


def test_the_entropy_on_the_host_is_the_torch_ops_entropy(monkeypatch):
    """row_entropies (what the entropy routers decide from) on the host, collab_decode/_hostops.c, and with the
    torch ops: the same entropies to float rounding, on rows flat and sharp, a wide vocabulary, a view of a padded
    one, and rows with banned (-inf) tokens, which add nothing (0 log 0 = 0) either way; NaN for a row that is
    not finite."""
    import math

    from collab_decode.routing import policies

    assert policies._hostops is not None, "collab_decode._hostops was not built (make setup builds it)"
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 449, generator=g) * torch.tensor([0.1, 1, 3, 10, 30, 100])[:, None]
    banned = torch.randn(3, 40, generator=g)
    banned[0, :10] = banned[1, 5] = -math.inf
    broken = torch.randn(3, 40, generator=g)
    broken[0, 3], broken[1, 7], broken[2] = math.nan, math.inf, -math.inf
    for logits in (wide, wide[:, :447], banned, broken):
        on_host = policies.row_entropies(logits)
        monkeypatch.setattr(policies, "HOST_ENTROPY_MAX_ROWS", 0)
        with_torch = policies.row_entropies(logits)
        monkeypatch.undo()
        assert [math.isnan(h) for h in on_host] == [math.isnan(h) for h in with_torch]
        assert [h for h in on_host if h == h] == pytest.approx([h for h in with_torch if h == h], rel=1e-5, abs=1e-6)
    assert [math.isnan(h) for h in policies.row_entropies(broken)] == [True, True, True]
    probs = torch.softmax(banned[0].double(), -1)
    assert policies.row_entropies(banned)[0] == pytest.approx(-float((probs[10:] * probs[10:].log()).sum()), rel=1e-6)


@pytest.mark.parametrize("t", [0.6, 1.5])
def test_the_entropy_gate_skips_only_rows_that_cannot_route(monkeypatch, t):
    """entropy:t routes no row whose top-1 probability p1 leaves no room for an entropy above t (max_entropy(p1, V)
    < t: its gate). On the demo pair, whose small model is sure of most tokens, requests one at a time and
    batched: the same tokens and writers as the same router asked at every step (its gate taken away), and the
    router is asked only on steps where some row is below the gate."""
    from collab_decode.bench.workload import demo_workload
    from collab_decode.demo import checkpoint_dir
    from collab_decode.routing.policies import EntropyRoute, entropy_gate

    calls = recorded_decides(monkeypatch, EntropyRoute)
    runs = {}
    for gated in (True, False):
        engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"))
        workload = demo_workload(engine.tokenizer, 4)
        prompts = [workload.request(i) for i in range(len(workload))]
        router = engine.router_for(parse_routing(f"entropy:{t}"))
        gate = router.gate
        assert gate == entropy_gate(t, engine.vocab_size) and 0.5 < gate < 1
        step_router = engine.router_for(parse_routing(f"step-entropy:{t}"))  # asked once a step: no gate to read
        assert step_router.gate is None and not step_router.reads_top1
        if not gated:
            router.gate = None
        calls.clear()
        results = [engine.generate([p], workload.sampling(), f"entropy:{t}")[0] for p in prompts[:2]]
        results += engine.generate(prompts, workload.sampling(), f"entropy:{t}")
        runs[gated] = ([(r.token_ids, r.provenance) for r in results], list(calls))
    (outputs, gated_calls), (ungated_outputs, ungated_calls) = runs[True], runs[False]
    assert outputs == ungated_outputs
    assert {w for _, provenance in outputs for w in provenance} == {"small", "large"}
    assert all(any(p < gate for p in top1) for top1 in gated_calls)  # asked only where some row may be routed
    assert 0 < len(gated_calls) < len(ungated_calls) / 2  # most steps spared


def test_max_entropy_bounds_every_row_and_the_gate_is_tight():
    """max_entropy(p1, V) is the entropy of p1 and the rest spread evenly, and no row with that top-1 probability
    has more; entropy_gate(t, V) is where it falls to t - ENTROPY_GATE_MARGIN."""
    from collab_decode.routing.policies import ENTROPY_GATE_MARGIN, entropy, entropy_gate, max_entropy

    vocab = 50
    generator = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 5.0, 10.0):
        logits = torch.randn(200, vocab, generator=generator) * scale
        p1 = torch.softmax(logits, -1).amax(-1)
        bounds = torch.tensor([max_entropy(float(p), vocab) for p in p1])
        assert (entropy(logits) <= bounds + 1e-5).all()
    p1 = 0.7  # the most entropy a top-1 of 0.7 allows: the other 0.3 even over 49 tokens
    even = torch.log(torch.tensor([p1] + [(1 - p1) / (vocab - 1)] * (vocab - 1)))
    assert float(entropy(even[None])) == pytest.approx(max_entropy(p1, vocab), abs=1e-5)
    for t in (0.01, 0.5, 1.0, 3.0):
        gate = entropy_gate(t, vocab)
        assert max_entropy(gate, vocab) == pytest.approx(t - ENTROPY_GATE_MARGIN, abs=1e-9)
        assert max_entropy(gate - 1e-6, vocab) > t - ENTROPY_GATE_MARGIN
    assert entropy_gate(5.0, vocab) == 0.0  # above log(50): no row can exceed it
    assert entropy_gate(0.0005, vocab) is None and entropy_gate(1.0, 0) is None
