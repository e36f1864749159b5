"""A Llama-like architecture that lives outside the package, to show what adding one takes: this file
and one registry entry (tests/models/test_registry.py registers it). Its one difference from Llama: the
token embeddings are scaled by a constant before the first layer (as Granite and Gemma do)."""

from __future__ import annotations

from collab_decode.models.llama import LlamaForCausalLM

EMBEDDING_SCALE = 2.0


class ScaledLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, input_ids, cos, sin, cache, meta):
        x = self.model.embed_tokens(input_ids) * EMBEDDING_SCALE
        for layer, k_cache, v_cache in zip(self.model.layers, cache.k, cache.v):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.model.norm(x)
