"""Shared test factories: tiny random-init Hugging Face checkpoints built in code (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from collab_decode.routing import Router

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

ARCH_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-tied-mha": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True)),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(
        max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
}


def make_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random-init transformers model of a tiny config of `arch` (a key of ARCH_CONFIGS)."""
    import transformers

    config_cls, model_cls, extra = ARCH_CONFIGS[arch]
    kwargs = {**TINY, **extra, **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    # random-init norms are all ones; perturb them so a wrong norm would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    model = make_hf_model(arch, seed, **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


DEMO_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def demo_tokenizer_dir() -> Path:
    from collab_decode.demo import checkpoint_dir

    return checkpoint_dir("small")


def save_tiny_lm(path: Path, seed: int, hidden: int = 64, layers: int = 2, vocab_size: int | None = None,
                 **overrides) -> Path:
    """A tiny random-init Llama with the demo tokenizer's files beside it (an engine-loadable model dir).
    `overrides` go to the config (e.g. initializer_range: larger weights make outputs hang on the context)."""
    import shutil

    from transformers import AutoTokenizer

    tok_dir = demo_tokenizer_dir()
    vocab = vocab_size or len(AutoTokenizer.from_pretrained(str(tok_dir)))
    model = make_hf_model("llama", seed, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                          intermediate_size=2 * hidden, eos_token_id=0, max_position_embeddings=512,
                          **{"tie_word_embeddings": True, **overrides})
    model.save_pretrained(str(path), safe_serialization=True)
    for name in DEMO_TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, path / name)
    return path


def save_lm_with_swapped_ids(path: Path) -> Path:
    """A tiny model whose tokenizer has the same strings as save_tiny_lm's but two ids swapped: a pair made with
    it does not share a tokenizer."""
    import json

    save_tiny_lm(path, seed=3)
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return path


def poison_embedding(model_dir: Path, token_id: int) -> Path:
    """Make a saved model's input embedding of `token_id` NaN: any sequence holding that token gets NaN
    hidden states and logits, the others none (the model must be untied, or every logit of that id is NaN)."""
    from safetensors.torch import load_file, save_file

    (path,) = model_dir.glob("*.safetensors")
    weights = load_file(str(path))
    weights["model.embed_tokens.weight"][token_id] = float("nan")
    save_file(weights, str(path), metadata={"format": "pt"})
    return model_dir


def make_poisoned_pair(root: Path, token_id: int) -> tuple[Path, Path]:
    """make_pair's models, untied, with the input embedding of `token_id` NaN in both: a request holding that
    token gets NaN logits from either model, every other request the logits it would get anyway."""
    small = save_tiny_lm(root / "small", seed=1, hidden=32, tie_word_embeddings=False)
    large = save_tiny_lm(root / "large", seed=2, hidden=64, layers=3, tie_word_embeddings=False)
    return poison_embedding(small, token_id), poison_embedding(large, token_id)


DECIDE_FAILS, OBSERVE_FAILS = 13, 14  # the seeds of the requests FlakyRoute fails on


class FlakyRoute(Router):
    """A router (policy "flaky", see register_flaky_policy) that raises for one request: in `decide` for a batch
    holding the sequence seeded DECIDE_FAILS, in `observe` for the one seeded OBSERVE_FAILS. Otherwise it routes
    the tokens the small model proposes with an even id: both models write, the same in a batch as alone."""

    def new_state(self, seed: int | None = None):
        return seed

    def decide(self, inputs) -> torch.Tensor:
        if DECIDE_FAILS in inputs.states:
            raise RuntimeError("decide failed")
        return inputs.proposed % 2 == 0

    def observe(self, state, routed: bool) -> None:
        if state == OBSERVE_FAILS:
            raise RuntimeError("observe failed")


def register_flaky_policy(monkeypatch) -> str:
    """Make "flaky" a routing policy (FlakyRoute) for one test, as a policy file and a registry line would."""
    from collab_decode.routing.registry import POLICIES, PolicyInfo

    monkeypatch.setitem(POLICIES, "flaky", PolicyInfo("token", None, None, f"{__name__}:FlakyRoute", "flaky"))
    return "flaky"


def make_pair(tmp_path: Path, **overrides) -> tuple[Path, Path]:
    """Tiny small/large models sharing the demo tokenizer (the large has more layers and width)."""
    return (save_tiny_lm(tmp_path / "small", seed=1, hidden=32, **overrides),
            save_tiny_lm(tmp_path / "large", seed=2, hidden=64, layers=3, **overrides))


def make_engine(small: Path, large: Path | None = None, compile: bool = False, routers=None, device: str = "cpu",
                **config):
    from collab_decode.engine.config import EngineConfig
    from collab_decode.engine.loading import build_engine

    return build_engine(small, large, device=device, config=EngineConfig(**config), compile=compile, routers=routers)
