"""Which native class runs a checkpoint: its config.json `architectures` name -> an `Architecture`.

A new Llama-like architecture is one model file plus one line here. The table holds strings, not
classes, so reading it (config parsing does) imports no torch; `model_class` imports on first use.
A model file that subclasses LlamaForCausalLM and writes its own `forward` should pass `keep` on to the
last layer as Llama's does: the backend then runs a chunk's last layer on the rows read only (a forward
without `keep` works, and runs every row).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    model_type: str  # the Hugging Face model_type family: decides which config checks apply
    impl: str  # "module:Class" of the native implementation
    qkv_bias: bool | None = None  # True: always biased q/k/v; None: from config.json's attention_bias
    o_bias_with_attention_bias: bool = True  # attention_bias also biases o_proj (all but Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)


_LLAMA = "collab_decode.models.llama:LlamaForCausalLM"
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", _LLAMA),
    "MistralForCausalLM": Architecture("mistral", _LLAMA),
    "Qwen2ForCausalLM": Architecture("qwen2", _LLAMA, qkv_bias=True, o_bias_with_attention_bias=False),
    "Qwen3ForCausalLM": Architecture("qwen3", _LLAMA, qk_norm=True),
}


def model_class(architecture: str) -> type:
    """The native model class registered for `architecture` (imported now)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"no native implementation of {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    module, _, name = ARCHITECTURES[architecture].impl.partition(":")
    return getattr(importlib.import_module(module), name)
