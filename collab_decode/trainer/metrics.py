"""Ranking metrics for routers and the single-signal baselines they must beat, on CPU tensors.

    scores (N,) higher = more likely divergent, labels (N,) 1 = divergent
      -> roc_auc, pr_auc (average precision), and the calibration table: per threshold, the recall of
         divergent positions and the large share (fraction of positions routed)
"""

from __future__ import annotations

import torch


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random divergent row scores above a random other row (ties count half)."""
    scores, labels = scores.double(), labels.bool()
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank."""
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    unique, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    if len(unique) < len(x):  # replace each tie group's ranks by their mean
        sums = torch.zeros(len(unique), dtype=x.dtype).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    return ranks


def pr_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision: the mean of precision at each divergent row, rows taken by descending score."""
    labels = labels.bool()
    if not labels.any():
        return float("nan")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    hits = labels[order].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.double)
    return float((precision * hits).sum() / hits.sum())


def calibration_table(scores: torch.Tensor, labels: torch.Tensor, num_points: int = 200) -> list[dict]:
    """Thresholds at score quantiles, each with the recall of divergent rows and the large share it gives
    (a row is routed when its score > threshold). Sorted by threshold, ascending. Besides `num_points`
    evenly spaced quantiles, large shares up to 10% get a point every 0.1%: the operating points live there."""
    scores, labels = scores.double(), labels.bool()
    qs = torch.cat([torch.linspace(0, 1, num_points, dtype=torch.double),
                    1 - torch.linspace(0, 0.1, 101, dtype=torch.double)]).clamp(0, 1)
    thresholds = torch.unique(torch.quantile(scores, qs))
    num_pos = max(1, int(labels.sum()))
    table = []
    for t in thresholds.tolist():
        routed = scores > t
        table.append({"threshold": t, "recall": int((routed & labels).sum()) / num_pos,
                      "large_share": float(routed.double().mean())})
    return table


def threshold_for_recall(table: list[dict], recall: float) -> dict:
    """The row with the highest threshold (smallest large share) that keeps recall >= target."""
    ok = [row for row in table if row["recall"] >= recall]
    return max(ok, key=lambda row: row["threshold"]) if ok else min(table, key=lambda row: row["threshold"])


def baseline_scores(top_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Single-signal routers from the small model's top-k logits (sorted descending), higher = route:
    entropy (over the top k, renormalised), 1 - top-1 probability, and minus the top-2 probability margin."""
    logp = torch.log_softmax(top_logits.double(), dim=-1)
    p = logp.exp()
    return {"entropy": -(p * logp).sum(-1), "top1_prob": 1 - p[:, 0], "top2_margin": -(p[:, 0] - p[:, 1])}
