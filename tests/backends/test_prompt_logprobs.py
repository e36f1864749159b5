"""Prompt logprobs (what a collab-decode server answers to `prompt_logprobs`, so that it can be another one's
remote large model): per prompt token its logprob given the tokens before it, its rank and the top n there,
from the model that prefills the prompt; the same whether the prompt is prefilled in one chunk or several,
and equal to a full forward of the model in transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from collab_decode.engine.scheduler import SchedulerConfig
from collab_decode.sampling import SamplingParams
from tests.utils import make_engine, make_pair

PROMPT = [5, 9, 23, 41, 7, 7, 30, 12, 40, 8, 19, 3, 33, 2, 17, 60, 4]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def scored(engine, policy: str, n: int = 3):
    seq_id = engine.add_request(PROMPT, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=n), policy)
    seq = engine.seqs[seq_id]
    while not seq.finished:
        engine.step()
    return seq.prompt_logprobs


def reference(model_dir, n: int = 3):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([PROMPT])).logits[0].float().log_softmax(-1)  # (T, V)
    out = [None]
    for i in range(1, len(PROMPT)):
        row = logprobs[i - 1]
        top = row.topk(n)
        out.append((float(row[PROMPT[i]]), int((row > row[PROMPT[i]]).sum()) + 1,
                    list(zip(top.indices.tolist(), top.values.tolist()))))
    return out


def assert_close(got, want):
    assert len(got) == len(want) == len(PROMPT) and got[0] is None
    for (lp, rank, top), (lp_ref, rank_ref, top_ref) in zip(got[1:], want[1:]):
        assert lp == pytest.approx(lp_ref, abs=1e-4) and rank == rank_ref
        assert [t for t, _ in top] == [t for t, _ in top_ref]
        assert [x for _, x in top] == pytest.approx([x for _, x in top_ref], abs=1e-4)


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 5])  # one chunk, or chunks of 5
def test_prompt_logprobs_of_the_model_that_prefills(pair, max_num_batched_tokens):
    engine = make_engine(*pair, scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens))
    assert_close(scored(engine, "small"), reference(pair[0]))
    assert_close(scored(engine, "entropy:0.5"), reference(pair[0]))  # the small model prefills first
    assert_close(scored(engine, "large"), reference(pair[1]))  # only the large model runs


def test_no_prompt_logprobs_unless_asked_and_zero_means_the_token_only(pair):
    engine = make_engine(*pair)
    seq_id = engine.add_request(PROMPT, SamplingParams(max_tokens=1, temperature=0.0), "small")
    seq = engine.seqs[seq_id]
    while not seq.finished:
        engine.step()
    assert seq.prompt_logprobs == []
    entries = scored(engine, "small", n=0)
    assert all(top == [] for _, _, top in entries[1:])
