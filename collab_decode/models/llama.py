"""The Llama family (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache, for ragged batches.

One forward takes every scheduled sequence's chunk of new tokens flattened into one row of T tokens
(prefill chunks and single-token decodes together). Per layer: project q/k/v for all T tokens, rotate,
then paged attention (models/attention.py) writes k/v into the cache and attends. The four
architectures differ only in config flags (qkv bias, qk-norm), which models/registry.py records.

Module names follow Hugging Face's, except that q/k/v and gate/up projections are fused into one
matmul each (fewer kernel launches per layer: most of a small model's decode time on a CPU);
`FUSED` says how a checkpoint's tensors are concatenated into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from collab_decode.models.attention import AttentionMetadata, KVCache, PagedAttention
from collab_decode.models.config import ModelConfig
from collab_decode.models.layers import Linear, RMSNorm
from collab_decode.models.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, qdim, kvdim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [qdim, kvdim, kvdim]
        # q, k and v projections fused into one matmul (checkpoints' q_proj/k_proj/v_proj are concatenated)
        self.qkv_proj = Linear(hidden, qdim + 2 * kvdim, bias=config.qkv_bias)
        self.o_proj = Linear(qdim, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> rotated q (T, H, D), rotated k and v (T, Hkv, D)."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # reshape: the projection may be transposed
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(torch.cat([q, k], dim=1), cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # gate and up projections fused into one matmul (checkpoints' gate_proj/up_proj are concatenated)
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, meta, keep: torch.Tensor | None = None):
        """x (T, hidden) -> (T, hidden); with `keep` (row indices), only those rows' outputs (len(keep), hidden).
        Every row's k/v still enters the cache: `keep` spares the attention, its output's projection and the
        MLP of rows nobody reads (a prefill chunk's rows before its last, in the last layer)."""
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(x), cos, sin)
        o = attn.attn(q, k, v, k_cache, v_cache, meta, keep)  # (len(keep), H * D) with keep
        if keep is not None:
            x = x[keep]
        x = x + attn.o_proj(o)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# fused parameter suffix -> the checkpoint tensors concatenated (along dim 0) to form it
FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


class LlamaForCausalLM(nn.Module):
    """Embeddings -> decoder layers over the paged cache -> final norm; logits only where asked."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                meta: AttentionMetadata, keep: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (T,) -> final hidden states (T, hidden), after the last norm; with `keep` (row indices),
        those rows' only (len(keep), hidden): the last layer runs its projection and MLP on them alone."""
        x = self.model.embed_tokens(input_ids)
        last = len(self.model.layers) - 1
        for i, (layer, k_cache, v_cache) in enumerate(zip(self.model.layers, cache.k, cache.v)):
            x = layer(x, cos, sin, k_cache, v_cache, meta, keep if i == last else None)
        return self.model.norm(x)

    def checkpoint_shapes(self) -> dict[str, torch.Size]:
        """The tensor names and shapes a Hugging Face checkpoint of this model holds (unfused)."""
        shapes = {}
        for name, p in self.state_dict().items():
            suffix = next((f for f in FUSED if name.endswith(f)), None)
            if suffix is None:
                shapes[name] = p.shape
                continue
            prefix = name[: -len(suffix)]
            parts = self.get_submodule(prefix + suffix.rsplit(".", 2)[0])
            sizes = parts.qkv_sizes if "qkv" in suffix else [p.shape[0] // 2] * 2
            for part, size in zip(FUSED[suffix], sizes):
                shapes[prefix + part] = torch.Size([size, *p.shape[1:]])
        return shapes

    def load_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        """Checkpoint tensors (checked against checkpoint_shapes) -> this model's fused parameters."""
        fused = dict(tensors)
        for name in list(tensors):
            for target, parts in FUSED.items():
                if name.endswith(parts[0]):
                    prefix = name[: -len(parts[0])]
                    fused[prefix + target] = torch.cat([fused.pop(prefix + part) for part in parts], dim=0)
        self.load_state_dict(fused, strict=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def decode(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch in which every sequence decodes one token: (hidden (B, hidden), logits (B, vocab))."""
        hidden = self(input_ids, cos, sin, cache, meta)
        return hidden, self.logits(hidden)
