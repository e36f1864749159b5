"""The Llama family (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache, for ragged batches.

One forward takes every scheduled sequence's chunk of new tokens flattened into one row of T tokens
(prefill chunks and single-token decodes together). Per layer: project q/k/v for all T tokens, rotate,
write k/v into the paged cache at each token's slot, then attend: the decoding sequences (one query
each) in one batched call over their gathered blocks, each prefilling chunk in its own causal call.

Module names follow Hugging Face's, except that q/k/v and gate/up projections are fused into one
matmul each (fewer kernel launches per layer: most of a small model's decode time on a CPU);
`FUSED` says how a checkpoint's tensors are concatenated into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from collab_decode.models.config import ModelConfig
from collab_decode.models.rope import apply_rope


@dataclass
class PrefillChunk:
    """One sequence processing more than one new token in this forward."""

    start: int  # its first token's index in the flattened batch
    end: int  # one past its last token's index
    num_cached: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # (num_blocks,) int64 physical blocks holding its first num_cached + chunk tokens


@dataclass
class AttentionMetadata:
    """Where the batch's tokens sit in the paged cache; built once per forward, shared by all layers."""

    slot_mapping: torch.Tensor  # (T,) int64 flat cache slot receiving each new token's k/v
    decode_token_idx: torch.Tensor | None  # (Bd,) int64 batch index of each decoding sequence's token
    decode_block_tables: torch.Tensor | None  # (Bd, max_blocks) int64, padded with block 0
    decode_mask: torch.Tensor | None  # (Bd, 1, 1, max_blocks * block_size) bool: key is in the sequence;
    #   None when every decoding sequence has the same length (then keys are cut to decode_len instead)
    prefills: list[PrefillChunk]
    decode_len: int = 0  # the common length of the decoding sequences when decode_mask is None
    only_decodes: bool = False  # every token of the batch decodes: q needs no reordering


class KVCache:
    """Paged K/V storage of one model: per layer (num_blocks, block_size, num_kv_heads, head_dim)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device, dtype):
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]


class Linear(nn.Linear):
    """nn.Linear, with the product on a CPU in float32 written the way decoding runs fastest there.

    A decode step multiplies each weight by a few rows (one per sequence); PyTorch's default CPU product
    (`x @ W.T`) is slow at that shape. Measured on this project's 2-core machine (a 20M model's 25
    weights, ms per step; `python -m collab_decode.bench.engine_bench` measures the whole engine):
      - 2 to 512 rows: `(W @ x.T).T`, the same product with the operands swapped, 8 instead of 17 ms at 2
        rows, 30 instead of 50 at 16, about equal from 64 rows up (prefill).
      - 1 row inside torch.compile: as a sum of products, which the compiler turns into one fused pass
        over the weight; 5.3 instead of 11.9 ms. Eagerly this would build W * x in memory, and the
        swapped product is no faster at 1 row (on the demo pair's 256-wide large model, 5-10% slower),
        so one row outside torch.compile stays `x @ W.T`.
    Elsewhere (CUDA, other dtypes) it is nn.Linear unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
            return super().forward(x)
        if x.shape[0] == 1:
            if not torch.compiler.is_compiling():
                return super().forward(x)
            y = (self.weight * x).sum(dim=-1)[None]  # (1, out)
        else:
            y = torch.mm(self.weight, x.t()).t()  # (rows, out), a transposed view
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 (as transformers does), scale in the model's dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.group = self.num_heads // self.num_kv_heads  # query heads per kv head
        self.scale = self.head_dim ** -0.5
        hidden, qdim, kvdim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [qdim, kvdim, kvdim]
        # q, k and v projections fused into one matmul (checkpoints' q_proj/k_proj/v_proj are concatenated)
        self.qkv_proj = Linear(hidden, qdim + 2 * kvdim, bias=config.qkv_bias)
        self.o_proj = Linear(qdim, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

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

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Write k/v into the paged cache, attend over each sequence's keys: (T, H * D), before o_proj."""
        num_tokens = q.shape[0]
        flat_shape = (-1, self.num_kv_heads, self.head_dim)
        k_cache.view(flat_shape).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(flat_shape).index_copy_(0, meta.slot_mapping, v)
        if meta.only_decodes:
            return self._decode(q, k_cache, v_cache, meta)
        out = q.new_empty(num_tokens, self.num_heads * self.head_dim)
        if meta.decode_token_idx is not None:
            out[meta.decode_token_idx] = self._decode(q[meta.decode_token_idx], k_cache, v_cache, meta)
        for chunk in meta.prefills:
            out[chunk.start:chunk.end] = self._prefill(q[chunk.start:chunk.end], k_cache, v_cache, chunk)
        return out

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        # cache (N, bs, Hkv, D), block_tables (B, nb) -> (B, Hkv, nb * bs, D)
        b, nb = block_tables.shape
        blocks = cache.index_select(0, block_tables.view(-1))  # (B * nb, bs, Hkv, D)
        return blocks.view(b, nb * cache.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        # the query heads sharing a kv head attend as one group: q (Bd, Hkv, G, D)
        b = q.shape[0]
        q = q.view(b, self.num_kv_heads, self.group, self.head_dim)
        k = self._gather(k_cache, meta.decode_block_tables)
        v = self._gather(v_cache, meta.decode_block_tables)
        if meta.decode_mask is None:  # equal lengths: cut the keys instead of masking them
            k, v = k[:, :, :meta.decode_len], v[:, :, :meta.decode_len]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=self.scale)
        return o.reshape(b, self.num_heads * self.head_dim)

    def _prefill(self, q, k_cache, v_cache, chunk: PrefillChunk) -> torch.Tensor:
        s = q.shape[0]
        num_keys = chunk.num_cached + s
        # (S, H, D) -> (1, Hkv, G * S, D): row g * S + i is query head (kv * G + g) at chunk position i
        q = q.view(s, self.num_kv_heads, self.group, self.head_dim).permute(1, 2, 0, 3)
        q = q.reshape(1, self.num_kv_heads, self.group * s, self.head_dim)
        k = self._gather(k_cache, chunk.block_table[None])[:, :, :num_keys]
        v = self._gather(v_cache, chunk.block_table[None])[:, :, :num_keys]
        query_pos = torch.arange(chunk.num_cached, num_keys, device=q.device)
        mask = torch.arange(num_keys, device=q.device)[None, :] <= query_pos[:, None]  # (S, L) causal
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(self.group, 1), scale=self.scale)
        o = o.view(self.num_kv_heads, self.group, s, self.head_dim).permute(2, 0, 1, 3)
        return o.reshape(s, self.num_heads * self.head_dim)


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

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(x), cos, sin)
        x = x + attn.o_proj(attn.attend(q, k, v, k_cache, v_cache, meta))
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


def checkpoint_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """The tensor names and shapes a Hugging Face checkpoint of this model holds (unfused)."""
    shapes = {}
    for name, p in model.state_dict().items():
        suffix = next((f for f in FUSED if name.endswith(f)), None)
        if suffix is None:
            shapes[name] = p.shape
            continue
        prefix = name[: -len(suffix)]
        parts = model.get_submodule(prefix + suffix.rsplit(".", 2)[0])
        sizes = parts.qkv_sizes if "qkv" in suffix else [p.shape[0] // 2] * 2
        for part, size in zip(FUSED[suffix], sizes):
            shapes[prefix + part] = torch.Size([size, *p.shape[1:]])
    return shapes


def fuse_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> this model's state dict (q/k/v and gate/up concatenated)."""
    out = dict(tensors)
    for name in list(tensors):
        for fused, parts in FUSED.items():
            if name.endswith(parts[0]):
                prefix = name[: -len(parts[0])]
                out[prefix + fused] = torch.cat([out.pop(prefix + part) for part in parts], dim=0)
    return out


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
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids (T,) -> final hidden states (T, hidden), after the last norm."""
        x = self.model.embed_tokens(input_ids)
        for layer, k_cache, v_cache in zip(self.model.layers, cache.k, cache.v):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def decode(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch in which every sequence decodes one token: (hidden (B, hidden), logits (B, vocab))."""
        hidden = self(input_ids, cos, sin, cache, meta)
        return hidden, self.logits(hidden)
