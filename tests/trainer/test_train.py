"""The router trainer and its checkpoints: learning a separable rule, metrics, calibration, round trips,
refusals of mismatched and corrupted checkpoints, share budgets answered from the calibration table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from collab_decode.routing import RouterContext, build_router, parse_routing
from collab_decode.routing.neural import load_router, save_router
from collab_decode.trainer.metrics import calibration_table, pr_auc, roc_auc, threshold_for_recall
from collab_decode.trainer.train import TrainSettings, fit, predict

HIDDEN, TOP_K = 8, 6


def synthetic(num_rows: int = 6000, seed: int = 0):
    """Router features of random positions; divergent when a hidden unit and an embedding unit are both high
    (a rule no single logit-based signal sees). 200 queries of 30 rows each."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_rows, 2 * HIDDEN + TOP_K, generator=g)
    divergent = ((features[:, 0] > 0.8) & (features[:, HIDDEN] > 0.8)).float()
    query = torch.arange(num_rows) // 30
    return features.half(), divergent, query


def test_metrics_on_hand_made_cases():
    scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert pr_auc(scores, labels) == pytest.approx((1 + 2 / 3) / 2)
    assert roc_auc(torch.full((4,), 0.5), labels) == pytest.approx(0.5)  # ties count half
    table = calibration_table(scores, labels, num_points=50)
    assert all(0 <= r["recall"] <= 1 and 0 <= r["large_share"] <= 1 for r in table)
    row = threshold_for_recall(table, 1.0)
    assert row["recall"] == 1.0 and row["threshold"] < 0.35


def test_training_learns_a_separable_rule():
    features, divergent, query = synthetic()
    val = query >= 160  # by query: the last 40 queries
    model, log = fit(features, divergent, ~val, val, HIDDEN, TOP_K, TrainSettings(epochs=60, patience=10),
                     progress=False)
    scores = predict(model, features[val])
    assert roc_auc(scores, divergent[val]) > 0.95
    assert log["epochs"][-1]["epoch"] >= 2


@pytest.fixture
def trained(tmp_path):
    features, divergent, query = synthetic(1500)
    val = query >= 40
    model, _ = fit(features, divergent, ~val, val, HIDDEN, TOP_K, TrainSettings(epochs=3), progress=False)
    table = calibration_table(predict(model, features[val]), divergent[val])
    config = {"hidden_size": HIDDEN, "top_k": TOP_K, "width": 64, "num_layers": 2, "threshold": 0.5,
              "calibration": table, "pair": {"fingerprint": "sha256:pair-a"}}
    save_router(tmp_path / "r", model, config)
    return tmp_path / "r", model, table


def test_checkpoint_round_trips_exactly(trained):
    path, model, _ = trained
    loaded = load_router(path, HIDDEN, "sha256:pair-a")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    x = torch.randn(5, 2 * HIDDEN + TOP_K)
    assert torch.equal(loaded.model(x), model(x))


def test_mismatched_and_corrupted_checkpoints_are_refused(trained):
    path, _, _ = trained
    with pytest.raises(ValueError, match="trained for another pair"):
        load_router(path, HIDDEN, "sha256:pair-b")
    with pytest.raises(ValueError, match="hidden size"):
        load_router(path, HIDDEN + 1)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_router(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid router config"):
        load_router(path)


def test_a_share_budget_gets_its_threshold_from_the_calibration_table(trained):
    path, _, table = trained
    context = RouterContext(HIDDEN, {"mine": load_router(path, HIDDEN)})
    for budget in (0.05, 0.2, 0.5):
        router = build_router(parse_routing({"policy": "neural", "router": "mine", "large_share": budget}), context)
        within = [r for r in table if r["large_share"] <= budget]
        assert router.threshold == min(r["threshold"] for r in within)
        row = next(r for r in table if r["threshold"] == router.threshold)
        assert row["large_share"] <= budget
    assert build_router(parse_routing("neural:mine"), context).threshold == 0.5  # the calibrated default
    assert build_router(parse_routing("neural:mine:0.7"), context).threshold == 0.7


def test_a_router_without_a_table_refuses_a_budget(tmp_path, trained):
    path, model, _ = trained
    config = json.loads((path / "config.json").read_text())
    del config["calibration"]
    save_router(tmp_path / "bare", model, config)
    context = RouterContext(HIDDEN, {"bare": load_router(tmp_path / "bare")})
    with pytest.raises(ValueError, match="no calibration table"):
        build_router(parse_routing("neural:bare:share=0.1"), context)


def test_the_functional_and_frozen_forwards_equal_the_layers(trained):
    """The trainer's functional forward and the serving copy (addmm over transposed weights, GELU through erf)
    compute the layers' function, at one row and at several."""
    from collab_decode.routing.neural import FrozenRouterMLP

    _, model, _ = trained
    frozen = FrozenRouterMLP(model)
    for rows in (1, 7):
        x = torch.randn(rows, 2 * HIDDEN + TOP_K)
        torch.testing.assert_close(model(x), model.net(x).squeeze(-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(frozen(x), model.net(x).squeeze(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_the_frozen_forward_folds_each_gelus_scales_into_its_neighbours(num_layers):
    """The serving copy moves GELU's 1 / sqrt(2) into the Linears on either side: right at any depth, for
    pre-activations of either sign and far out in GELU's tails."""
    from collab_decode.routing.neural import FrozenRouterMLP, RouterMLP

    torch.manual_seed(num_layers)
    model = RouterMLP(HIDDEN, TOP_K, width=24, num_layers=num_layers).eval().requires_grad_(False)
    x = torch.randn(5, 2 * HIDDEN + TOP_K) * 4
    with torch.no_grad():
        for layer in model.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(3)  # pre-activations of +-10 and more: GELU's tails, where its two halves differ
        torch.testing.assert_close(FrozenRouterMLP(model)(x), model.net(x).squeeze(-1), rtol=1e-5, atol=1e-5)


def _router_inputs(rows: int, vocab: int = 20, seed: int = 1):
    """Random router inputs of `rows` rows; every third row's small model is sure of token 0."""
    from collab_decode.routing.policies import RouterInputs

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    logits[::3, 0] += 12.0
    table = torch.randn(vocab, HIDDEN, generator=g)
    return RouterInputs([None] * rows, logits, torch.randn(rows, HIDDEN, generator=g), logits.argmax(-1),
                        lambda ids: table[ids], logits.amax(-1))


@pytest.mark.parametrize("rows", [1, 12, 40])  # 40: the gate's exp-sum form (from 16 rows)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("sampler_top1", [False, True])  # the gate reads the sampler's top-1 probabilities
def test_neural_decisions_are_its_scores_against_the_threshold(trained, rows, threshold, sampler_top1):
    """decide() compares MLP logits with logit(threshold) on the host and gates with the sampler's max (or its
    top-1 probabilities, from a greedy batch); it must route exactly where sigmoid(MLP) > threshold on the rows
    the gate lets through (scores())."""
    from collab_decode.routing.neural import LoadedRouter, NeuralRoute
    from collab_decode.routing.policies import top1_prob

    _, model, _ = trained
    inputs = _router_inputs(rows)
    if sampler_top1:
        inputs.top1 = top1_prob(inputs.logits).tolist()
    router = NeuralRoute(LoadedRouter(model, {"threshold": threshold, "gate": 0.9}))
    sure = (top1_prob(inputs.logits) >= 0.9).tolist()
    assert router.uncertain_rows(inputs) == [i for i, s in enumerate(sure) if not s]
    expected = (router.scores(inputs) > threshold).tolist()
    assert router.decide(inputs) == expected
    assert not any(e for e, s in zip(expected, sure) if s)  # the gate's rows never route
    if rows == 40 and 0 < threshold < 0.97:
        assert any(expected) and not all(expected)  # the case tells routed from not routed


def test_the_fine_calibration_points_cover_small_shares():
    scores, labels = torch.rand(20_000, generator=torch.Generator().manual_seed(0)), torch.zeros(20_000)
    shares = sorted(r["large_share"] for r in calibration_table(scores, labels))
    for target in torch.linspace(0.001, 0.1, 100).tolist():
        assert min(abs(s - target) for s in shares) < 2e-4, target


def test_the_confidence_gate_skips_sure_positions_and_keeps_the_rest(trained):
    """Rows where the small model's top-1 probability reaches the gate score 0 (never routed); the others
    score exactly what the ungated router gives them. The trainer's gate sits above every divergent row."""
    from collab_decode.routing.neural import LoadedRouter, NeuralRoute
    from collab_decode.routing.policies import top1_prob
    from collab_decode.trainer.train import confidence_gate

    assert confidence_gate(torch.tensor([0.3, 0.99, 0.6, 0.2]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.8)
    _, model, _ = trained
    inputs = _router_inputs(12)  # every third row: the small model is sure
    logits = inputs.logits
    ungated = NeuralRoute(LoadedRouter(model, {"threshold": 0.5})).scores(inputs)
    gated = NeuralRoute(LoadedRouter(model, {"threshold": 0.5, "gate": 0.9})).scores(inputs)
    sure = top1_prob(logits) >= 0.9
    assert sure.sum() == 4 and (ungated[sure] > 0).all()
    assert (gated[sure] == 0).all()
    torch.testing.assert_close(gated[~sure], ungated[~sure], rtol=0, atol=1e-6)


def test_prompt_lookup_features_by_hand():
    from collab_decode.routing.features import LOOKUP_SIZE, PromptIndex, lookup_features

    index = PromptIndex([1, 2, 3, 9, 1, 2, 4, 7])  # after (1, 2): 3 or 4; after (2, 3): 9 only
    top = [3, 5, 4, 8, 6], [0.5, 0.2, 0.15, 0.1, 0.05]
    # the longest suffix the prompt holds is (1, 2): two continuations, top-1 (3) and top-3 (4) among them
    assert lookup_features(index, [8, 8, 1, 2], *top) == pytest.approx([2 / 8, 2.0, 1.0, 0.0, 0.65, 0.0])
    # (9, 1, 2) is in the prompt too: the longer match wins, and only 4 follows it
    assert lookup_features(index, [8, 9, 1, 2], *top) == pytest.approx([3 / 8, 1.0, 0.0, 0.0, 0.15, 1.0])
    # (2, 3) -> 9 only: unique, and neither proposal is it
    assert lookup_features(index, [2, 3], *top) == pytest.approx([2 / 8, 1.0, 0.0, 0.0, 0.0, 1.0])
    assert lookup_features(index, [5, 6], *top) == [0.0] * LOOKUP_SIZE  # 6 is not in the prompt


def test_the_lookups_top_tokens_are_the_softmaxs_from_one_topk():
    """The lookup's top tokens and probabilities come from the features' topk and the top-1 probability (no second
    softmax): the softmax's own, for rows sure and unsure, with -inf (banned) entries among the logits."""
    from collab_decode.routing.features import LOOKUP_TOP, top_tokens
    from collab_decode.routing.policies import top1_prob

    torch.manual_seed(3)
    logits = torch.randn(6, 50) * torch.tensor([0.5, 1, 2, 4, 8, 16])[:, None]
    logits[0, 7] = -math.inf
    top = torch.topk(logits, 12, dim=-1)
    ids, probs = top_tokens(top.values, top.indices, top1_prob(logits).tolist())
    expected_probs, expected_ids = torch.softmax(logits, dim=-1).topk(LOOKUP_TOP, dim=-1)
    assert ids == expected_ids.tolist()
    torch.testing.assert_close(torch.tensor(probs), expected_probs, rtol=1e-6, atol=1e-7)


def test_training_learns_a_lookup_rule_and_the_checkpoint_keeps_it(tmp_path):
    """With --prompt-lookup the last LOOKUP_SIZE columns join the features: a rule only they carry (the
    prompt continues the context, and not with the small model's top-1) is learned, saved and loaded back."""
    from collab_decode.routing.features import LOOKUP_SIZE
    from collab_decode.routing.neural import RouterMLP

    features, _, query = synthetic()
    g = torch.Generator().manual_seed(3)
    lookup = torch.zeros(len(features), LOOKUP_SIZE)
    lookup[:, 0] = (torch.rand(len(features), generator=g) < 0.5).float()  # the prompt holds the context
    lookup[:, 2] = (torch.rand(len(features), generator=g) < 0.5).float()  # ... continued with the top-1
    divergent = ((lookup[:, 0] == 1) & (lookup[:, 2] == 0)).float()
    x = torch.cat([features.float(), lookup], dim=-1)
    val = query >= 160
    settings = TrainSettings(epochs=30, patience=10, prompt_lookup=True)
    model, _ = fit(x, divergent, ~val, val, HIDDEN, TOP_K, settings, progress=False)
    assert roc_auc(predict(model, x[val]), divergent[val]) > 0.95
    with pytest.raises(RuntimeError):  # without the lookup columns the sizes do not match
        RouterMLP(HIDDEN, TOP_K, 64, 2, prompt_lookup=False).load_state_dict(model.state_dict())
    save_router(tmp_path / "r", model, {"hidden_size": HIDDEN, "top_k": TOP_K, "width": 64, "num_layers": 2,
                                        "prompt_lookup": True})
    loaded = load_router(tmp_path / "r", HIDDEN)
    assert loaded.model.prompt_lookup and loaded.frozen.prompt_lookup
    torch.testing.assert_close(loaded.model(x[:9]), model(x[:9]), rtol=0, atol=0)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("prompt_lookup", [False, True])
def test_the_router_on_the_host_computes_what_its_torch_ops_compute(num_layers, prompt_lookup, monkeypatch):
    """NeuralRoute's MLP at a few rows computed on the host (collab_decode/_hostops.c: each row's features read from
    the tensors' memory, the stack in C) equals the torch ops' (router_features, FrozenRouterMLP) to float rounding,
    at any depth, with and without the prompt lookup, on rows picked out of a batch whose logits are a view (a
    padded vocabulary cut off); and decides the same, at a threshold that splits the rows."""
    from types import SimpleNamespace

    from collab_decode.routing import neural
    from collab_decode.routing.neural import LoadedRouter, NeuralRoute, RouterMLP
    from collab_decode.routing.policies import RouterInputs, top1_prob

    assert neural._hostops is not None, "collab_decode._hostops was not built (make setup builds it)"
    torch.manual_seed(num_layers)
    model = RouterMLP(HIDDEN, TOP_K, width=24, num_layers=num_layers, prompt_lookup=prompt_lookup)
    model = model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    vocab, rows = 30, 6
    logits = (torch.randn(rows, vocab + 2, generator=g) * 3)[:, :vocab]
    table, hidden = torch.randn(vocab, HIDDEN, generator=g), torch.randn(rows, HIDDEN, generator=g)
    proposed = logits.argmax(-1)
    prompts = [torch.randint(0, vocab, (12,), generator=g).tolist() for _ in range(rows)]
    contexts = [SimpleNamespace(prompt_ids=p, token_ids=p + p[3:7]) for p in prompts]  # the prompt continues them

    def inputs_for(router):
        return RouterInputs([router.new_state() for _ in range(rows)], logits, hidden, proposed, lambda ids: table[ids],
                            contexts=contexts, top1=top1_prob(logits).tolist(), proposed_ids=proposed.tolist(),
                            embedding=table)

    router = NeuralRoute(LoadedRouter(model, {"threshold": 0.5}))
    inputs = inputs_for(router)
    for chosen in ([0], [1, 4], [0, 2, 3, 5]):
        with_torch = router.model(router.features(inputs.select(chosen))).tolist()
        assert router._host_logits(inputs, chosen) == pytest.approx(with_torch, rel=1e-5, abs=1e-5)
    z = sorted(router.model(router.features(inputs)).tolist())
    threshold = 1 / (1 + math.exp(-(z[2] + z[3]) / 2))  # halfway between two rows' logits: three route, three not
    router = NeuralRoute(LoadedRouter(model, {"threshold": threshold}))
    on_host = router.decide(inputs_for(router))
    monkeypatch.setattr(neural, "HOST_MAX_ROWS", 0)
    assert router.decide(inputs_for(router)) == on_host and sum(on_host) == 3


def test_the_hosts_top_logits_and_mlp_refuse_what_they_cannot_read():
    """_hostops.top: each row's largest logits, descending, as torch.topk (the lower id first among equal ones);
    _hostops.mlp: a row that is not the input's width, or a stack that does not chain, is an error, not a read past
    what it was given."""
    from collab_decode.routing.neural import _hostops

    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
    logits[1, :30] = -math.inf
    logits[2, [3, 9, 20]] = 5.0  # a three-way tie at the top
    ids, values = _hostops.top(logits.data_ptr(), 4, 40, 40, 7)
    expected = torch.topk(logits, 7, dim=-1)
    assert values == expected.values.tolist()
    assert ids[2][:3] == [3, 9, 20]
    assert [ids[r] for r in (0, 1, 3)] == expected.indices[[0, 1, 3]].tolist()
    with pytest.raises(ValueError, match="k must be"):
        _hostops.top(logits.data_ptr(), 4, 40, 40, 41)
    weight, bias = torch.ones(3), torch.zeros(3)
    layer_w, layer_b = torch.ones(3, 1), torch.zeros(1)
    norm, layers = (weight.data_ptr(), bias.data_ptr(), 1e-5, 3), [(layer_w.data_ptr(), layer_b.data_ptr(), 3, 1)]
    assert _hostops.mlp([[1.0, 2.0, 3.0]], norm, layers) == pytest.approx([0.0], abs=1e-6)  # normalised: sum 0
    with pytest.raises(ValueError, match="has 2 features, the input 3"):
        _hostops.mlp([[1.0, 2.0]], norm, layers)
    with pytest.raises(TypeError, match="a row is a list"):
        _hostops.mlp([(1.0, 2.0, 3.0)], norm, layers)
    with pytest.raises(ValueError, match="input is not the width before it"):
        _hostops.mlp([[1.0, 2.0, 3.0]], norm, [(layer_w.data_ptr(), layer_b.data_ptr(), 2, 1)])
