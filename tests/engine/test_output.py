"""Stop handling and streamed text through the engine, on the demo pair, against the demo tokenizer's decode
and the transformers model's own greedy tokens."""

from __future__ import annotations

import pytest
import torch

from collab_decode.sampling import SamplingParams
from tests.utils import make_engine

EOS = 0  # the demo tokenizer's <|endoftext|>, the demo models' eos_token_id
NEVER = "@@@@@@@@"  # a stop string the demo models never write: 7 characters held back while streaming


@pytest.fixture(scope="module")
def demo():
    """The demo engine, a chat prompt (token ids) and the demo small model's greedy answer to it (transformers)."""
    from transformers import AutoModelForCausalLM

    from collab_decode.demo import checkpoint_dir
    from collab_decode.demo.task import problems
    from collab_decode.demo.tokenizer import chat_prompt

    engine = make_engine(checkpoint_dir("small"), checkpoint_dir("large"))
    prompt = engine.tokenizer(chat_prompt(problems("heldout", 1)[0].question))["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir("small"))).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=400, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    reference = out[0, len(prompt):].tolist()
    assert reference[-1] == EOS and len(reference) > 100  # a whole answer, ended by the model itself
    return engine, prompt, reference


def decode(engine, ids):
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def greedy(max_tokens=400, **kwargs):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def check_all_free(engine):
    assert not engine.has_unfinished()
    assert all(kv.num_used_blocks == 0 for kv in engine.kv.values())


def test_eos_ends_the_output_and_the_text_is_the_tokenizers_decode(demo):
    engine, prompt, reference = demo
    result = engine.generate([prompt], greedy(), "small")[0]
    assert result.token_ids == reference and result.finish_reason == "stop"
    assert result.text == decode(engine, reference) and "<|endoftext|>" not in result.text
    check_all_free(engine)


def test_stop_token_ids_end_the_output_at_that_token(demo):
    engine, prompt, reference = demo
    # the first token (past the first 20) not seen before: the output must end right there, with it
    j = next(i for i in range(20, len(reference)) if reference[i] not in reference[:i])
    result = engine.generate([prompt], greedy(stop_token_ids=(reference[j], 1)), "small")[0]  # 1: never written
    assert result.token_ids == reference[:j + 1] and result.finish_reason == "stop"
    assert result.text == decode(engine, reference[:j + 1])
    check_all_free(engine)


def test_stop_strings_cut_the_text_just_before_the_earliest_one(demo):
    engine, prompt, reference = demo
    text = decode(engine, reference)
    # two stop strings of three tokens each (so they span token boundaries), taken from the answer
    stops = [decode(engine, reference[i:i + 3]) for i in (60, 30)]
    cut = min(text.index(s) for s in stops)
    assert 10 < cut < len(text) - 20
    result = engine.generate([prompt], greedy(stop=(NEVER, *stops)), "small")[0]
    assert result.text == text[:cut] and result.finish_reason == "stop"
    # the output's tokens run to the one that completed the earliest stop string, no further
    ids = result.token_ids
    assert ids == reference[:len(ids)]
    assert min(i for i in (decode(engine, ids).find(s) for s in stops) if i >= 0) == cut
    assert not any(s in decode(engine, ids[:-1]) for s in stops)
    check_all_free(engine)


@pytest.mark.parametrize("max_tokens", [60, 400])  # ended by length, and by EOS
def test_held_back_text_is_released_when_no_stop_string_occurs(demo, max_tokens):
    engine, prompt, reference = demo
    plain = engine.generate([prompt], greedy(max_tokens), "small")[0]
    held = engine.generate([prompt], greedy(max_tokens, stop=(NEVER, "#")), "small")[0]
    assert held.token_ids == plain.token_ids == reference[:max_tokens]
    assert held.text == plain.text == decode(engine, reference[:max_tokens])
    assert held.finish_reason == plain.finish_reason == ("length" if max_tokens < len(reference) else "stop")
    check_all_free(engine)


def test_streamed_deltas_add_up_to_the_final_output(demo):
    """Driving engine.step() by hand: per request, the concatenated new_text / new_token_ids / new_provenance
    equal the final text, tokens and provenance, for requests with and without stop strings, side by side,
    under policies that commit one token a step and several."""
    engine, prompt, reference = demo
    text = decode(engine, reference)
    stop = text.splitlines()[3][-5:]
    requests = [(greedy(), "small"), (greedy(stop=(NEVER,)), "small"), (greedy(stop=(stop,)), "small"),
                (greedy(stop=(NEVER,)), "speculative:3"), (greedy(120, stop=(NEVER, stop)), "entropy:0.3"),
                (SamplingParams(max_tokens=80, temperature=1.0, seed=7, stop=(NEVER,)), "random:0.5")]
    ids = [engine.add_request(prompt, s, policy) for s, policy in requests]
    streamed = {i: ("", [], []) for i in ids}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            t, toks, prov = streamed[out.seq_id]
            streamed[out.seq_id] = (t + out.new_text, toks + out.new_token_ids, prov + out.new_provenance)
            if out.finished:
                assert out.seq_id not in finals  # one final output per request
                finals[out.seq_id] = out.seq
    assert set(finals) == set(ids)
    for i in ids:
        seq, (t, toks, prov) = finals[i], streamed[i]
        assert t == seq.output_text and toks == seq.output_ids and prov == seq.provenance
    for i, expected in zip(ids[:3], [text, text, text[:text.index(stop)]]):  # the small model's answer
        assert finals[i].output_text == expected
    for i in ids:  # the tokenizer's decode of the output tokens, cut before the earliest stop string in it
        full = decode(engine, finals[i].output_ids)
        cut = min((full.index(s) for s in finals[i].sampling.stop if s in full), default=len(full))
        assert finals[i].output_text == full[:cut]
    assert finals[ids[2]].finish_reason == finals[ids[4]].finish_reason == "stop"  # cut by `stop`
    assert "large" in finals[ids[5]].provenance and "small" in finals[ids[5]].provenance
    check_all_free(engine)


def test_text_that_is_not_streamed_comes_at_flushes_and_at_the_end(demo):
    """stream_text=False (the engine process, generate, the benchmarks): outputs carry no text until the
    caller flushes or the request ends, except where a stop string needs the text every step; flushed
    pieces and the final output add up to the same text as a streamed request's, the tokens unchanged."""
    engine, prompt, reference = demo
    text = decode(engine, reference)
    stop = text.splitlines()[3][-5:]
    requests = [(greedy(), "small"), (greedy(stop=(stop,)), "small"), (greedy(150), "entropy:0.3"),
                (greedy(stop=(NEVER,)), "speculative:3")]
    streamed_ids = [engine.add_request(prompt, s, policy) for s, policy in requests]
    quiet_ids = [engine.add_request(prompt, s, policy, stream_text=False) for s, policy in requests]
    pieces = {i: [] for i in streamed_ids + quiet_ids}
    finals, step = {}, 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            pieces[out.seq_id].append(out.new_text)
            if out.finished:
                finals[out.seq_id] = out.seq
            elif out.seq_id == quiet_ids[0] and step < 100:
                assert out.new_text == ""  # no stop string: nothing detokenized yet
        if step % 7 == 0:  # the engine process flushes every few milliseconds
            for i in quiet_ids[2:]:
                if i not in finals:
                    pieces[i].append(engine.output.flush_text(engine.seqs[i]))
    for streamed, quiet in zip(streamed_ids, quiet_ids):
        assert finals[quiet].output_ids == finals[streamed].output_ids
        assert "".join(pieces[quiet]) == finals[quiet].output_text == finals[streamed].output_text
    assert finals[quiet_ids[0]].output_text == text and pieces[quiet_ids[0]][-1] == text  # all at the end
    assert finals[quiet_ids[1]].output_text == text[:text.index(stop)]  # the stop string still cuts it
    assert sum(bool(p) for p in pieces[quiet_ids[2]]) > 2  # the flushes delivered text before the end
    check_all_free(engine)
