"""load_model: bad checkpoints fail with a CheckpointError naming the problem, before any weight is
allocated; sharded and bfloat16 checkpoints load and match the single-file float32 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import collab_decode.models.loader as loader
from collab_decode.backends.base import ModelInput, SeqChunk
from collab_decode.backends.native import NativeBackend
from collab_decode.models.config import ModelConfig
from collab_decode.models.loader import CheckpointError, load_model
from tests.utils import make_hf_model, save_hf_model

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
K_PROJ = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_hf_model(tmp_path / "ckpt", "llama")


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, edit) -> None:
    """Rewrite model.safetensors with `edit(tensors)` applied to its dict of tensors."""
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def expect_error(path: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value).replace(str(path), "<ckpt>")  # tmp paths hold the test's name: match past them
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@torch.inference_mode()
def last_logits(backend: NativeBackend, token_ids: list[int]) -> torch.Tensor:
    backend.init_cache(8, 4)
    return backend.forward(ModelInput([SeqChunk(0, token_ids, 0, list(range(8)), all_positions=True)])).all_logits[0]


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nowhere", "does not exist")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    expect_error(ckpt, "config.json")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    expect_error(ckpt, "config.json", "not valid JSON")


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    expect_error(ckpt, "no model.safetensors")


def test_only_pickle_weights(ckpt):
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    expect_error(ckpt, "pickle")


@pytest.mark.parametrize("changes, fragments", [
    (dict(architectures=["GPT2ForCausalLM"]), ["unsupported architecture", "GPT2ForCausalLM"]),
    (dict(foo_bar=1), ["foo_bar"]),
    (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
    (dict(mlp_bias=True), ["mlp_bias"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), ["yarn"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "rope_theta": 1e4}), ["yarn"]),
    (dict(rope_scaling={"type": "longrope", "factor": 4.0}, rope_parameters=None), ["longrope"]),
    (dict(layer_types=["full_attention", "sliding_attention"]), ["sliding_attention"]),
], ids=["architecture", "unknown-field", "hidden-act", "mlp-bias", "yarn", "yarn-params", "longrope", "layer-types"])
def test_unsupported_config(ckpt, changes, fragments):
    edit_config(ckpt, **changes)
    expect_error(ckpt, *fragments)


def test_mistral_sliding_window_inside_the_context_is_refused(tmp_path):
    path = save_hf_model(tmp_path / "mistral", "mistral")
    edit_config(path, sliding_window=8)
    expect_error(path, "sliding_window=8")


def reshape(tensors):
    tensors[K_PROJ] = tensors[K_PROJ].reshape(64, 32).contiguous()  # same numel, wrong shape


def drop(tensors):
    del tensors[Q_PROJ]


def add(tensors):
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(4)


TENSOR_FAULTS = [
    (reshape, [K_PROJ, "(64, 32)", "(32, 64)"]),
    (drop, ["lacks", Q_PROJ]),
    (add, ["unexpected", "model.layers.0.self_attn.extra.weight"]),
]


@pytest.mark.parametrize("edit, fragments", TENSOR_FAULTS, ids=["shape", "missing", "unexpected"])
def test_bad_tensors(ckpt, edit, fragments):
    edit_tensors(ckpt, edit)
    expect_error(ckpt, *fragments)


@pytest.mark.parametrize("corrupt", [
    lambda data: data[: len(data) // 2],  # truncated in the tensor data
    lambda data: data[:20],  # truncated in the header
    lambda data: b"\x00garbage" * 64,
    lambda data: b"",
], ids=["truncated-data", "truncated-header", "garbage", "empty"])
def test_corrupted_safetensors(ckpt, corrupt):
    file = ckpt / "model.safetensors"
    file.write_bytes(corrupt(file.read_bytes()))
    expect_error(ckpt, "model.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("edit", [reshape, drop, add], ids=["shape", "missing", "unexpected"])
def test_errors_raise_before_weights_are_allocated(ckpt, edit, monkeypatch):
    """Validation runs on a meta-device model; a model with real storage is built only for a good checkpoint."""
    built = []

    from collab_decode.models.llama import LlamaForCausalLM

    class Spy(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            built.append(next(self.parameters()).device.type)

    monkeypatch.setattr(loader, "model_class", lambda architecture: Spy)
    edit_tensors(ckpt, edit)
    with pytest.raises(CheckpointError):
        load_model(ckpt)
    assert built == ["meta"]


def test_sharded_checkpoint_matches_single_file(tmp_path):
    single = save_hf_model(tmp_path / "single", "llama")
    sharded = tmp_path / "sharded"
    make_hf_model("llama").save_pretrained(str(sharded), max_shard_size="40KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(shards) > 2
    assert not (sharded / "model.safetensors").exists()
    ids = list(range(3, 15))
    expected = last_logits(NativeBackend(load_model(single)), ids)
    assert torch.equal(last_logits(NativeBackend(load_model(sharded)), ids), expected)

    shards[1].unlink()
    expect_error(sharded, "missing", shards[1].name)


def test_bfloat16_load_is_close_to_float32(ckpt):
    model = load_model(ckpt, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = list(range(5, 17))
    logits_bf16 = last_logits(NativeBackend(model), ids)
    logits_f32 = last_logits(NativeBackend(load_model(ckpt)), ids)
    # bf16 keeps ~3 significant digits; these random logits are O(0.3)
    assert logits_bf16.dtype == torch.float32  # ModelOutput logits are float32 whatever the weights
    assert (logits_bf16 - logits_f32).abs().max().item() < 0.05


def test_tied_checkpoint_shares_the_embedding(tmp_path):
    model = load_model(save_hf_model(tmp_path / "tied", "llama-tied-mha"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.device.type == "cpu"


@pytest.mark.parametrize("arch, rope_type", [("llama-linear", "linear"), ("llama-dynamic", "dynamic"),
                                             ("llama3", "llama3")])
def test_transformers_4_rope_config_reads_like_5(tmp_path, arch, rope_type):
    """Older config.json files keep rope_theta at the top and rope_scaling with "type" or "rope_type"."""
    path = save_hf_model(tmp_path / arch, arch)
    expected = ModelConfig.from_dir(path)
    params = json.loads((path / "config.json").read_text()).pop("rope_parameters")
    theta = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    edit_config(path, rope_parameters=None, rope_theta=theta, rope_scaling=params)
    assert ModelConfig.from_dir(path) == expected
    assert expected.rope.type == rope_type


def test_loaded_linears_are_packed_except_a_tied_output_layer(tmp_path):
    """The loader stores each Linear's weight (in, out) in memory (models/layers.py Linear.pack): the same
    (out, in) parameter, the same products; the tied output layer keeps the embedding's row-major table."""
    from collab_decode.models.layers import Linear

    model = load_model(save_hf_model(tmp_path / "tied", "llama-tied-mha"))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    assert not linears["lm_head"].packed and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.is_contiguous()
    packed = [m for name, m in linears.items() if name != "lm_head"]
    assert packed and all(m.packed and m.weight.t().is_contiguous() for m in packed)
    layer = packed[0]
    plain = Linear(layer.in_features, layer.out_features, bias=False)
    plain.weight.data.copy_(layer.weight)
    assert plain.weight.is_contiguous() and not plain.packed
    for rows in (1, 2, 5, 16, 40):  # both sides of SWAP_MIN_ELEMENTS for the plain layer
        x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
