"""The neural router's input at a position, computed by one function for serving and for labels.

Features: [the small model's last-layer hidden state, the input embedding of the token it proposes
(from its own embedding table), its top-k logits sorted descending], and for routers trained with it the
prompt lookup (`lookup_features`: does the prompt continue this context, and with the small model's
choice?). The online router and the offline label pipeline both call `router_features` and
`lookup_features`, so training and serving see identical inputs.
"""

from __future__ import annotations

import math

import torch


def router_features(hidden: torch.Tensor, token_embedding: torch.Tensor, logits: torch.Tensor,
                    top_k: int, lookup: torch.Tensor | None = None, top_values: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(B, H) hidden, (B, H) proposed-token embedding, (B, V) logits [, (B, LOOKUP_SIZE) lookup_features]
    -> (B, 2H + top_k [+ LOOKUP_SIZE]) float32. `top_values`: the rows' largest logits sorted descending, at least
    top_k of them, where the caller took them already (for the prompt lookup's top tokens: one topk for both)."""
    if top_values is None:
        top_values = torch.topk(logits, top_k, dim=-1).values  # (B, k), sorted descending
    elif top_values.shape[-1] != top_k:
        top_values = top_values[:, :top_k]
    parts = [hidden, token_embedding, top_values] + ([] if lookup is None else [lookup])
    return torch.cat([p if p.dtype == torch.float32 else p.float() for p in parts], dim=-1)


def feature_size(hidden_size: int, top_k: int, prompt_lookup: bool = False) -> int:
    return 2 * hidden_size + top_k + (LOOKUP_SIZE if prompt_lookup else 0)


# ---- prompt lookup: does the prompt say what comes next? --------------------------------------------------
# The small model's own states cannot tell a hesitation that matters from one that does not where it copies
# from the prompt (a number a question states): the lookup can. router_models/demo/README.md has the study.
LOOKUP_MAX_N = 8  # longest context suffix looked up in the prompt
LOOKUP_TOP = 5  # the small model's top tokens the lookup compares with
LOOKUP_SIZE = 6  # features per position


class PromptIndex:
    """Every n-gram of a prompt (n = 1..LOOKUP_MAX_N) -> the tokens that follow it there."""

    def __init__(self, prompt_ids: list[int]):
        self.next: dict[tuple[int, ...], set[int]] = {}
        for n in range(1, LOOKUP_MAX_N + 1):
            for j in range(len(prompt_ids) - n):
                self.next.setdefault(tuple(prompt_ids[j:j + n]), set()).add(prompt_ids[j + n])

    def longest(self, context: list[int]) -> tuple[int, set[int] | None]:
        """(n, what follows) for the longest suffix of `context` (n <= LOOKUP_MAX_N) the prompt holds."""
        for n in range(min(LOOKUP_MAX_N, len(context)), 0, -1):
            found = self.next.get(tuple(context[len(context) - n:]))
            if found is not None:
                return n, found
        return 0, None


def lookup_features(index: PromptIndex, context: list[int], top_ids: list[int], top_probs: list[float]
                    ) -> list[float]:
    """LOOKUP_SIZE features of the position after `context`: the longest suffix the prompt holds (/ max), how
    many tokens follow it there, whether the small model's top-1 and top-2 are among them, the small model's
    probability on them, and whether the prompt's continuation is unique. Zeros where nothing matches."""
    n, following = index.longest(context)
    if following is None:
        return [0.0] * LOOKUP_SIZE
    mass = sum(p for t, p in zip(top_ids, top_probs) if t in following)
    return [n / LOOKUP_MAX_N, float(len(following)), float(top_ids[0] in following), float(top_ids[1] in following),
            mass, float(len(following) == 1)]


def top_tokens(top_logits: torch.Tensor, top_ids: torch.Tensor, top1_probs: list[float]
               ) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's LOOKUP_TOP most likely token ids and their probabilities, on the host, from its largest logits
    (sorted descending, at least LOOKUP_TOP of them: a topk's values and indices) and its top-1 probability."""
    ids, values = top_ids[:, :LOOKUP_TOP].tolist(), top_logits[:, :LOOKUP_TOP].tolist()
    return ids, [top_probs(row, p1) for p1, row in zip(top1_probs, values)]


def top_probs(top_logits: list[float], top1_prob: float) -> list[float]:
    """The probabilities of a row's largest logits (descending) from its top-1 probability: p_i = p_1 exp(l_i - l_1),
    the softmax's, without another pass over the vocabulary."""
    return [top1_prob * math.exp(v - top_logits[0]) for v in top_logits]
