"""Model configuration: a Hugging Face `config.json` of the Llama family, parsed and validated.

`ModelConfig.from_hf_dict(d)` accepts the architectures models/registry.py lists (Llama, Mistral, Qwen2,
Qwen3). Every field in the file
is either honoured, harmless metadata, or checked to have the one value we implement; anything else
is refused with an error that names it, so a model never runs with math we silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collab_decode.models.registry import ARCHITECTURES

# Fields that do not change the forward pass.
METADATA_FIELDS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "_name_or_path", "attention_dropout",
    "max_window_layers", "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class",
    "id2label", "label2id", "keys_to_ignore_at_inference", "is_decoder",
    "rope_scaling", "rope_parameters", "rope_theta", "problem_type",
    "sep_token_id", "decoder_start_token_id", "chunk_size_feed_forward", "task_specific_params",
    "finetuning_task", "prefix", "layer_types",
}
HONOURED_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias",
}
# Fields we accept only with the value(s) listed: the one behaviour we implement.
REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),
    "use_sliding_window": (False,),
    "sliding_window": (None,),
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ConfigError(ValueError):
    """A checkpoint configuration we cannot run exactly."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: theta and the scaling variant (HF `rope_parameters` / `rope_scaling`)."""

    theta: float = 10000.0
    type: str = "default"  # default | linear | dynamic | llama3
    factor: float = 1.0  # linear, dynamic, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3 (and dynamic, if given)

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError(f"rope theta and factor must be > 0, got theta={self.theta}, factor={self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """The Llama-family hyperparameters our native implementation runs."""

    architecture: str  # a key of models/registry.py's ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama/Mistral when attention_bias (then o_proj too)
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    rope: RopeConfig = field(default_factory=RopeConfig)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture].model_type

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Parse a config.json dict; raise ConfigError naming every field we cannot honour."""
        archs = d.get("architectures") or []
        if len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {archs!r}; the native backend runs "
                              f"{', '.join(ARCHITECTURES)} (use --backend transformers for others)")
        arch = archs[0]
        spec = ARCHITECTURES[arch]
        model_type = spec.model_type
        _check_fields(d, model_type)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        attention_bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if spec.qkv_bias is None else spec.qkv_bias,
            o_bias=spec.o_bias_with_attention_bias and attention_bias,
            qk_norm=spec.qk_norm,
            rope=_rope_config(d),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ()),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file} not found: a model directory needs a Hugging Face config.json")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)


def _check_fields(d: dict[str, Any], model_type: str) -> None:
    unknown = sorted(k for k in d if k not in METADATA_FIELDS | HONOURED_FIELDS | set(REQUIRED_VALUES))
    if unknown:
        raise ConfigError(f"config field(s) not supported by the native backend: {', '.join(unknown)}")
    wrong = []
    for key, allowed in REQUIRED_VALUES.items():
        value = d.get(key, allowed[0])
        if key == "sliding_window" and (not d.get("use_sliding_window", model_type == "mistral") or
                                        (value or 0) >= d.get("max_position_embeddings", 0)):
            continue  # a window that never applies (disabled, or wider than the context) changes nothing
        if value not in allowed:
            wrong.append(f"{key}={value!r} (supported: {', '.join(map(repr, allowed))})")
    if model_type == "qwen2" and d.get("attention_bias") is False:
        wrong.append("attention_bias=False (Qwen2 has qkv bias)")
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        wrong.append(f"layer_types={sorted(set(layer_types))!r} (supported: full_attention)")
    if wrong:
        raise ConfigError("config value(s) not supported by the native backend: " + "; ".join(wrong))


def _rope_config(d: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); 4.x writes rope_theta + rope_scaling
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:  # before its parameters, which only make sense for a known type
        raise ConfigError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    known = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    extra = sorted(set(params) - known)
    if extra and rope_type != "default":
        raise ConfigError(f"rope parameter(s) not supported for rope type {rope_type!r}: {', '.join(extra)}")
    return RopeConfig(theta=float(theta), type=rope_type, **{k: params[k] for k in known if k in params})
