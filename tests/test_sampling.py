"""Tests for collab_decode.sampling: tiny vocabularies, no models."""

import math
import re

import pytest
import torch

from collab_decode import sampling
from collab_decode.sampling import (
    SampleOutput,
    Sampler,
    SamplingParams,
    check_stop,
    clear_top1,
    make_generator,
    processed_probs,
)

VOCAB = 12


def random_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # (B, V)


def sample(logits, params, generators=None) -> SampleOutput:
    generators = generators if generators is not None else [None] * len(params)
    return Sampler().sample(logits, params, generators)


@pytest.fixture(params=["host", "torch"])
def greedy_path(request, monkeypatch):
    """Greedy batches sampled by collab_decode/_hostops.c (at every batch size) or by the torch ops (other devices,
    larger batches, an install without a C compiler)."""
    if request.param == "host":
        assert sampling._hostops is not None, "collab_decode._hostops was not built (make setup builds it)"
        monkeypatch.setattr(sampling, "HOST_GREEDY_MAX_ROWS", 1 << 20)
    else:
        monkeypatch.setattr(sampling, "_hostops", None)
    return request.param


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


# --- greedy and temperature ---------------------------------------------------------------------

def test_greedy_equals_argmax_and_consumes_no_randomness(greedy_path):
    logits = random_logits(5)
    generators = [make_generator(i) for i in range(5)]
    states = [g.get_state() for g in generators]
    out = sample(logits, [SamplingParams(temperature=0)] * 5, generators)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states))


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = random_logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5)] * 3
    out = sample(logits, params, [make_generator(i) for i in range(6)])
    assert torch.equal(out.token_ids[::2], logits[::2].argmax(-1))


def test_tiny_temperature_behaves_like_greedy():
    logits = random_logits(8)
    params = [SamplingParams(temperature=1e-3, seed=i) for i in range(8)]
    probs = processed_probs(logits, params)
    assert torch.allclose(probs, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float(),
                          atol=1e-4)
    for step in range(5):
        generators = [make_generator(100 * step + i) for i in range(8)]
        assert torch.equal(sample(logits, params, generators).token_ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 1e-300, 5e-324])
def test_underflowing_temperature_is_greedy_not_token_0(temperature):
    logits = random_logits(8) + 50  # large logits: logits / 1e-30 alone would overflow to inf
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(8)]
    probs = processed_probs(logits, params)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float())
    generators = [make_generator(i) for i in range(8)]
    out = sample(logits, params, generators)
    assert torch.equal(out.token_ids, logits.argmax(-1)) and not out.nonfinite_rows


def test_rows_with_nan_or_inf_logits_are_flagged_and_the_others_unchanged(greedy_path):
    logits = random_logits(6)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[3] = float("-inf")  # nothing finite at all
    logits[4, :5] = float("-inf")  # banned tokens are fine
    params = [SamplingParams(temperature=1.0, seed=i, logprobs=2) for i in range(6)]
    out = sample(logits, params, [make_generator(i) for i in range(6)])
    assert out.nonfinite_rows == [1, 2, 3]
    assert all(0 <= t < VOCAB for t in out.token_id_list)
    for row in (0, 4, 5):  # what each healthy row draws alone, with its own generator
        alone = sample(logits[row:row + 1], params[row:row + 1], [make_generator(row)])
        assert out.token_id_list[row] == alone.token_id_list[0] and not alone.nonfinite_rows
    assert out.token_id_list[4] >= 5 and torch.isfinite(out.logprobs[4])  # never a banned token
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert greedy.nonfinite_rows == [1, 2, 3]


# --- greedy tokens with the top-1 probability (a router's gate) ---------------------------------------

def near_tie_logits() -> torch.Tensor:
    """Rows the softmax cannot tell apart at the top, and rows it can."""
    logits = torch.full((6, VOCAB), float("-inf"))
    logits[0, 2], logits[0, 5] = 1e-9, 2e-9  # exp rounds both to 1: equal probabilities, 5 the larger logit
    logits[1, 3] = logits[1, 7] = 0.25  # an exact tie: the first index, as max takes it
    logits[2, :] = torch.linspace(-3, 3, VOCAB)  # a clear winner (the last)
    logits[3, 4], logits[3, 9] = 0.0, -1e-8  # 4 larger by less than exp's rounding near 1
    logits[4, :] = 0.0  # all equal: 1 / VOCAB each
    logits[5, 1] = 8.0  # one finite logit: probability 1
    logits[5, 6] = 7.999999
    return logits


def test_greedy_with_top1_takes_the_logits_argmax_even_at_near_ties(greedy_path):
    """The fused path picks tokens from the softmax's max; where that could differ from the logits' argmax (two
    probabilities equal to float32 precision), it must fall back to the logits. Every row: the max's token."""
    logits = torch.cat([near_tie_logits(), random_logits(50, seed=3), random_logits(50, seed=4) * 10])
    greedy = [SamplingParams(temperature=0)] * len(logits)
    fused = Sampler().sample(logits, greedy, [None] * len(logits), top1=True)
    assert fused.token_id_list == logits.max(-1).indices.tolist()
    assert fused.token_id_list[:2] == [5, 3]  # (the softmax alone would say 2 for row 0)
    assert torch.softmax(logits[0], -1)[2] == torch.softmax(logits[0], -1)[5]  # the case is real
    expected = torch.softmax(logits, -1).amax(-1).tolist()  # what the gate computed itself
    if greedy_path == "torch":
        assert fused.top1_probs == expected
    else:  # (the C sum's rounding is not the softmax kernel's)
        assert fused.top1_probs == pytest.approx(expected, rel=1e-6)
    assert not fused.nonfinite_rows


def host_and_torch(logits: torch.Tensor, params: list[SamplingParams], top1: bool, monkeypatch) -> tuple:
    """Sampler.sample of a greedy batch on the host (collab_decode/_hostops.c) and with the torch ops."""
    monkeypatch.setattr(sampling, "HOST_GREEDY_MAX_ROWS", 1 << 20)
    on_host = Sampler().sample(logits, params, [None] * len(params), top1)
    monkeypatch.setattr(sampling, "_hostops", None)
    with_torch = Sampler().sample(logits, params, [None] * len(params), top1)
    monkeypatch.undo()
    return on_host, with_torch


@pytest.mark.parametrize("top1", [False, True])
@pytest.mark.parametrize("logprobs", [None, 0, 3])
def test_the_host_greedy_sampler_gives_what_the_torch_ops_give(top1, logprobs, monkeypatch):
    """Tokens (the first largest logit), the finite check, top-1 probabilities and logprobs, on rows of every kind:
    near ties, random, a wide vocabulary, NaN / +inf / nothing finite / banned tokens; and on the views the engine
    hands the sampler (a padded vocabulary cut off: rows further apart than their length; columns not contiguous)."""
    assert sampling._hostops is not None, "collab_decode._hostops was not built (make setup builds it)"
    wide = torch.randn(7, 447, generator=torch.Generator().manual_seed(7)) * 4
    broken = random_logits(5, seed=9)
    broken[1, 3], broken[2, 0], broken[3], broken[4, :5] = float("nan"), float("inf"), float("-inf"), float("-inf")
    batches = [near_tie_logits(), random_logits(1), random_logits(40, seed=2) * 10, wide, broken,
               wide[:, :440], random_logits(VOCAB, seed=4).t()]
    for logits in batches:
        params = [SamplingParams(temperature=0, logprobs=logprobs)] * len(logits)
        on_host, with_torch = host_and_torch(logits, params, top1, monkeypatch)
        assert on_host.token_id_list == with_torch.token_id_list == logits.max(-1).indices.tolist()
        assert torch.equal(on_host.token_ids, with_torch.token_ids) and on_host.token_ids.dtype == torch.int64
        assert on_host.nonfinite_rows == with_torch.nonfinite_rows
        if top1:
            expected = torch.softmax(logits, -1).amax(-1).tolist()
            assert [math.isnan(p) for p in on_host.top1_probs] == [math.isnan(p) for p in expected]
            assert [p for p in on_host.top1_probs if p == p] == pytest.approx([p for p in expected if p == p], rel=1e-6)
        else:
            assert on_host.top1_probs is None
        for name in ("logprobs", "top_ids", "top_logprobs"):
            a, b = getattr(on_host, name), getattr(with_torch, name)
            if a is None or b is None:
                assert a is None and b is None, name
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert host_and_torch(broken, [SamplingParams(temperature=0)] * 5, top1, monkeypatch)[0].nonfinite_rows == [1, 2, 3]


def test_greedy_with_top1_trusts_the_softmax_only_above_one_half(greedy_path):
    assert clear_top1(12) == pytest.approx(0.5, abs=1e-5) and clear_top1(12) > 0.5
    assert 0.5 < clear_top1(152_000) < 0.52  # a large vocabulary's sum carries more rounding
    logits = random_logits(200, seed=5) * 2
    top1 = torch.softmax(logits, -1).amax(-1)
    assert (top1 > clear_top1(VOCAB)).any() and (top1 <= clear_top1(VOCAB)).any()  # both kinds of row
    fused = Sampler().sample(logits, [SamplingParams(temperature=0)] * 200, [None] * 200, top1=True)
    assert fused.token_id_list == logits.argmax(-1).tolist()


def test_greedy_with_top1_flags_the_same_nonfinite_rows(greedy_path):
    logits = random_logits(6)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[3] = float("-inf")
    logits[4, :5] = float("-inf")  # banned tokens are fine
    greedy = [SamplingParams(temperature=0)] * 6
    fused = Sampler().sample(logits, greedy, [None] * 6, top1=True)
    assert fused.nonfinite_rows == sample(logits, greedy).nonfinite_rows == [1, 2, 3]
    assert [math.isfinite(p) for p in fused.top1_probs] == [True, False, False, False, True, True]
    assert [fused.token_id_list[r] for r in (0, 4, 5)] == logits[[0, 4, 5]].argmax(-1).tolist()


def test_top1_is_computed_only_for_greedy_batches_that_ask(greedy_path):
    logits = random_logits(4)
    assert sample(logits, [SamplingParams(temperature=0)] * 4).top1_probs is None
    mixed = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)] * 2
    out = Sampler().sample(logits, mixed, [None, make_generator(1)] * 2, top1=True)
    assert out.top1_probs is None and out.token_id_list[::2] == logits[::2].argmax(-1).tolist()


def test_top_k_1_equals_greedy(greedy_path):
    logits = random_logits(6)
    params = [SamplingParams(temperature=2.0, top_k=1)] * 6
    assert params[0].greedy
    assert torch.equal(sample(logits, params).token_ids, logits.argmax(-1))
    expected = torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float()
    assert torch.equal(processed_probs(logits, params), expected)


# --- processed_probs ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, VOCAB - 1])
def test_top_k_keeps_exactly_k_tokens(k):
    logits = random_logits(4)
    probs = processed_probs(logits, [SamplingParams(top_k=k, temperature=0.7)] * 4)
    top_ids = logits.topk(k, dim=-1).indices  # (B, k)
    assert torch.equal((probs > 0).sum(-1), torch.full((4,), k))
    assert torch.all(probs.gather(-1, top_ids) > 0)
    expected = (logits.gather(-1, top_ids) / 0.7).softmax(-1)
    assert torch.allclose(probs.gather(-1, top_ids), expected, atol=1e-6)


@pytest.mark.parametrize("top_k", [0, -1, VOCAB, VOCAB + 5])
def test_disabled_or_large_top_k_keeps_everything(top_k):
    logits = random_logits(3)
    probs = processed_probs(logits, [SamplingParams(top_k=top_k)] * 3)
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-6)


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.3, 1), (0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    base = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = base.log()[None, :]  # (1, 4)
    probs = processed_probs(logits, [SamplingParams(top_p=top_p)])[0]
    order = base.argsort(descending=True)
    expected = torch.zeros(4)
    expected[order[:kept]] = base[order[:kept]] / base[order[:kept]].sum()
    assert torch.allclose(probs, expected, atol=1e-6)


def test_top_p_applies_after_top_k_renormalisation():
    base = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top-k=2 leaves (4/7, 3/7); top_p=0.5 then needs only the first.
    probs = processed_probs(base.log()[None], [SamplingParams(top_k=2, top_p=0.5)])[0]
    assert torch.allclose(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_processed_probs_rows_sum_to_one():
    params = [
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.3, top_k=4),
        SamplingParams(temperature=1.7, top_p=0.6),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.9),
        SamplingParams(top_p=1e-9),
    ]
    logits = random_logits(len(params))
    logits[0, 3] = -math.inf  # masked (padding) vocab rows must not break it
    probs = processed_probs(logits, params)
    assert probs.shape == (len(params), VOCAB)
    assert torch.allclose(probs.sum(-1), torch.ones(len(params)), atol=1e-5)
    assert probs[0, 3] == 0
    assert torch.equal(probs[5], torch.nn.functional.one_hot(logits[5].argmax(), VOCAB).float())


# --- seeded sampling --------------------------------------------------------------------------------

def run_request(row_logits, extra_rows, position, seed=1234, num_steps=6):
    """Tokens drawn for one seeded request at `position` in a batch with `extra_rows` others."""
    target = SamplingParams(temperature=1.3, top_p=0.95, seed=seed)
    generator = make_generator(seed)
    others = [SamplingParams(temperature=0.8, seed=i) for i in range(extra_rows)]
    other_generators = [make_generator(i) for i in range(extra_rows)]
    others[:1] = [SamplingParams(temperature=0)] * min(1, extra_rows)  # a greedy neighbour
    other_generators[1:2] = [None] * min(1, extra_rows - 1)  # and one on the global RNG
    tokens = []
    for step in range(num_steps):
        batch = random_logits(extra_rows, seed=50 + step) if extra_rows else torch.empty(0, VOCAB)
        logits = torch.cat([batch[:position], row_logits[step:step + 1], batch[position:]])
        params = others[:position] + [target] + others[position:]
        generators = other_generators[:position] + [generator] + other_generators[position:]
        tokens.append(int(sample(logits, params, generators).token_ids[position]))
    return tokens


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    row_logits = random_logits(6, seed=9) * 0.3  # flat enough that draws really vary
    alone = run_request(row_logits, extra_rows=0, position=0)
    assert alone == run_request(row_logits, extra_rows=0, position=0)
    assert alone == run_request(row_logits, extra_rows=3, position=2)
    assert alone == run_request(row_logits, extra_rows=5, position=0)
    assert alone == run_request(row_logits, extra_rows=4, position=4)
    assert len(set(alone)) > 1
    assert any(run_request(row_logits, 0, 0, seed=s) != alone for s in range(5))


# --- frequencies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_frequencies_match_softmax_global_rng(temperature):
    num_draws = 20000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(num_draws, 4)
    torch.manual_seed(0)
    out = sample(logits, [SamplingParams(temperature=temperature)] * num_draws)
    counts = torch.bincount(out.token_ids, minlength=4)
    # df = 3: p = 0.001 at 16.3; 30 is generous yet far below any real bias at this sample size.
    assert chi_square(counts, (logits[0] / temperature).softmax(-1)) < 30


def test_frequencies_match_processed_probs_seeded_rows():
    num_draws = 3000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15]).log().expand(num_draws, 5)
    params = [SamplingParams(temperature=0.8, top_k=3, seed=i) for i in range(num_draws)]
    out = sample(logits, params, [make_generator(p.seed) for p in params])
    counts = torch.bincount(out.token_ids, minlength=5)
    probs = processed_probs(logits[:1], params[:1])[0]
    assert counts[probs == 0].sum() == 0  # never outside the top-k
    assert chi_square(counts[probs > 0], probs[probs > 0]) < 25  # df = 2


# --- logprobs ---------------------------------------------------------------------------------------

def test_chosen_logprobs_are_raw_log_softmax():
    logits = random_logits(4)
    params = [SamplingParams(temperature=0.5, top_k=3, seed=1, logprobs=0), SamplingParams(temperature=0),
              SamplingParams(top_p=0.7, seed=2), SamplingParams(temperature=2.0, seed=3)]
    out = sample(logits, params, [make_generator(p.seed) for p in params])
    expected = logits.log_softmax(-1).gather(-1, out.token_ids[:, None]).squeeze(-1)
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, expected)
    assert out.top_ids is None and out.top_logprobs is None
    # nobody asks: nothing is computed
    assert sample(logits[1:], params[1:], [make_generator(p.seed) for p in params[1:]]).logprobs is None


def test_top_logprobs_sorted_and_sized_to_largest_request():
    logits = random_logits(3)
    params = [SamplingParams(logprobs=0), SamplingParams(logprobs=5), SamplingParams(logprobs=2)]
    out = sample(logits, params)
    raw = logits.log_softmax(-1)
    assert out.top_ids.shape == out.top_logprobs.shape == (3, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.equal(out.top_ids, raw.topk(5, dim=-1).indices)
    assert torch.allclose(out.top_logprobs, raw.gather(-1, out.top_ids))


# --- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, quoted",
    [
        (dict(max_tokens=0), "0"),
        (dict(temperature=-0.5), "-0.5"),
        (dict(temperature=float("nan")), "nan"),
        (dict(temperature=float("inf")), "inf"),
        (dict(top_p=0.0), "0.0"),
        (dict(top_p=1.5), "1.5"),
        (dict(top_k=-2), "-2"),
        (dict(logprobs=21), "21"),
        (dict(logprobs=-1), "-1"),
        (dict(seed="abc"), "'abc'"),
        (dict(stop=["ok", ""]), "''"),
        # what the engine cannot represent: integers beyond int64 (seeds: torch's [-2**63, 2**64)), floats
        # beyond float32
        (dict(max_tokens=2**63), str(2**63)),
        (dict(top_k=2**63), str(2**63)),
        (dict(seed=2**64), str(2**64)),
        (dict(seed=-2**63 - 1), str(-2**63 - 1)),
        (dict(stop_token_ids=[3, -1]), "[-1]"),
        (dict(stop_token_ids=[2**63]), str(2**63)),
        (dict(stop_token_ids=["7"]), "'7'"),
        (dict(temperature=1e39), "1e+39"),
        (dict(top_p=float("nan")), "nan"),
    ],
)
def test_validation_errors_quote_the_value(kwargs, quoted):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(quoted)}") as e:
        SamplingParams(**kwargs)
    assert e.value.param == name  # the REST layer reports it as the error's `param`


def test_the_edges_of_each_range_are_accepted():
    params = SamplingParams(max_tokens=2**63 - 1, top_k=2**63 - 1, seed=2**64 - 1, stop_token_ids=[0, 2**63 - 1],
                            temperature=float(torch.finfo(torch.float32).max))
    assert sample(random_logits(1), [params], [make_generator(params.seed)]).token_ids.shape == (1,)
    assert SamplingParams(seed=-2**63, temperature=5e-324).seed == -2**63


def test_stop_lists_become_tuples():
    assert SamplingParams(stop="###").stop == ("###",)
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4])
    assert params.stop == ("a", "b") and params.stop_token_ids == (3, 4)
    hash(params)  # frozen and hashable
    assert SamplingParams(logprobs=20, top_k=-1, seed=0).logprobs == 20


# --- stop strings -----------------------------------------------------------------------------------

def test_check_stop_match_across_token_boundary():
    # "Hello wor" was there; the new token added "ld!".
    assert check_stop("Hello world!", 9, ("world",)) == 6
    assert check_stop("abcXY", 4, ("XY",)) == 3  # starts exactly len(s) - 1 before the new text


def test_check_stop_earliest_of_several_wins():
    text = "x = 1\n\nAnswer: 42"
    assert check_stop(text, 3, ("Answer", "\n\n")) == 5
    assert check_stop(text, 3, ("\n\n", "Answer")) == 5
    assert check_stop("aXbY", 0, ("Y", "X", "b")) == 1


def test_check_stop_no_match():
    assert check_stop("Hello world", 6, ("STOP",)) is None
    assert check_stop("Hello world", 6, ()) is None
    # A match lying wholly in older text was handled on an earlier step.
    assert check_stop("abc STOP defg", 10, ("STOP",)) is None
