"""The neural router's input at a position, computed by one function for serving and for labels.

Features: [the small model's last-layer hidden state, the input embedding of the token it proposes
(from its own embedding table), its top-k logits sorted descending]. The online router and the
offline label pipeline both call `router_features`, so training and serving see identical inputs.
"""

from __future__ import annotations

import torch


def router_features(hidden: torch.Tensor, token_embedding: torch.Tensor, logits: torch.Tensor,
                    top_k: int) -> torch.Tensor:
    """(B, H) hidden, (B, H) proposed-token embedding, (B, V) logits -> (B, 2H + top_k) float32."""
    top = torch.topk(logits.float(), top_k, dim=-1).values  # (B, k), sorted descending
    return torch.cat([hidden.float(), token_embedding.float(), top], dim=-1)


def feature_size(hidden_size: int, top_k: int) -> int:
    return 2 * hidden_size + top_k
