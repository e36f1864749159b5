"""The model registry: a checkpoint's `architectures` name picks the native class; a new Llama-like
architecture is one file (tests/models/scaled_llama.py) plus one registry entry."""

from __future__ import annotations

import json

import pytest
import torch

from collab_decode.models.registry import ARCHITECTURES, Architecture, model_class
from tests.utils import make_hf_model


def test_known_architectures_resolve_and_unknown_ones_are_named():
    assert {model_class(name).__name__ for name in ARCHITECTURES} == {"LlamaForCausalLM"}
    with pytest.raises(ValueError, match="no native implementation of 'GPT2LMHeadModel'"):
        model_class("GPT2LMHeadModel")


def test_a_new_architecture_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    from tests.models import scaled_llama
    from tests.utils import save_tiny_lm

    monkeypatch.setitem(ARCHITECTURES, "ScaledLlamaForCausalLM",
                        Architecture("llama", "tests.models.scaled_llama:ScaledLlamaForCausalLM"))
    path = save_tiny_lm(tmp_path / "scaled", seed=3, hidden=32, initializer_range=0.2)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["ScaledLlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))

    # the reference: transformers' Llama on the same weights, with the scale folded into the embedding input
    reference = make_hf_model("llama", seed=3, vocab_size=config["vocab_size"], hidden_size=32, num_hidden_layers=2,
                              intermediate_size=64, tie_word_embeddings=True, eos_token_id=0,
                              max_position_embeddings=512, initializer_range=0.2)
    prompt = [5, 17, 42, 8, 100]
    with torch.no_grad():
        ids = list(prompt)
        for _ in range(12):
            embeds = reference.get_input_embeddings()(torch.tensor([ids])) * scaled_llama.EMBEDDING_SCALE
            ids.append(int(reference(inputs_embeds=embeds).logits[0, -1].argmax()))

    from collab_decode.engine.loading import build_engine
    from collab_decode.sampling import SamplingParams

    engine = build_engine(path)
    assert type(engine.backends["small"].model).__name__ == "ScaledLlamaForCausalLM"
    result = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert result.token_ids == ids[len(prompt):]
