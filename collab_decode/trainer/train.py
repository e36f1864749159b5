"""Train the neural router on a label dataset (collab_decode/labels), calibrate it, save it.

    read_dataset(DIR) -> features (N, 2H + k), divergent (N,), usable (N,), query_index (N,)
      -> split by query (never by row) -> BCE with positive weighting, AdamW, early stopping on
         validation PR-AUC -> scores on the validation rows -> metrics for the router and for the
         single-signal baselines -> calibration table (threshold, recall, large share) -> threshold
         for the recall target -> router checkpoint (safetensors + config.json with the pair fingerprint)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from collab_decode.routing.neural import RouterMLP, save_router
from collab_decode.trainer.metrics import (baseline_scores, calibration_table, pr_auc, roc_auc,
                                           threshold_for_recall)


@dataclass(frozen=True)
class TrainSettings:
    width: int = 64  # hidden width of the MLP (the router must stay cheap next to the small model)
    num_layers: int = 2
    epochs: int = 40  # most passes over the training rows
    patience: int = 4  # epochs without a better validation PR-AUC before stopping
    batch_size: int = 4096
    lr: float = 2e-3
    weight_decay: float = 0.01
    max_pos_weight: float = 100.0  # positive weight = #negatives / #positives, capped
    val_fraction: float = 0.2  # queries held out for validation and calibration
    recall_target: float = 0.95  # calibrated threshold: the smallest large share keeping this recall
    seed: int = 0
    prompt_lookup: bool = False  # add the prompt lookup features (routing/features.py) to the router's input

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        for name in ("width", "num_layers", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainResult:
    model: RouterMLP
    config: dict  # what config.json holds: sizes, threshold, calibration, metrics, fingerprint


def fit(features: torch.Tensor, divergent: torch.Tensor, train: torch.Tensor, val: torch.Tensor,
        hidden_size: int, top_k: int, settings: TrainSettings, progress: bool = True) -> tuple[RouterMLP, dict]:
    """Train on rows `train`, early-stop on rows `val` (bool masks over N); returns the best model and a log.
    With settings.prompt_lookup, `features` end with the LOOKUP_SIZE lookup columns."""
    torch.manual_seed(settings.seed)
    model = RouterMLP(hidden_size, top_k, settings.width, settings.num_layers, settings.prompt_lookup)
    x_train, y_train = features[train].float(), divergent[train].float()
    x_val, y_val = features[val].float(), divergent[val].float()
    num_pos = float(y_train.sum())
    if num_pos == 0 or y_val.sum() == 0:
        raise ValueError("the training or validation rows hold no divergent position: label more queries")
    pos_weight = torch.tensor(min(settings.max_pos_weight, (len(y_train) - num_pos) / num_pos))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    best, best_state, stale, log = -1.0, None, 0, []
    t0 = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        val_scores = predict(model, x_val)
        val_ap = pr_auc(val_scores, y_val)
        log.append({"epoch": epoch + 1, "train_loss": total / len(y_train), "val_pr_auc": val_ap})
        if progress:
            print(f"\repoch {epoch + 1}/{settings.epochs}  loss {total / len(y_train):.4f}  val PR-AUC {val_ap:.4f}"
                  f"  {time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
        if val_ap > best:
            best, stale = val_ap, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= settings.patience:
                break
    if progress:
        print(file=sys.stderr)
    model.load_state_dict(best_state)
    return model.eval().requires_grad_(False), {"epochs": log, "seconds": round(time.perf_counter() - t0, 1),
                                                "pos_weight": float(pos_weight)}


@torch.no_grad()
def predict(model: RouterMLP, features: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.sigmoid(model(features[i:i + batch_size].float()))
                      for i in range(0, len(features), batch_size)])


def evaluate(scores: torch.Tensor, divergent: torch.Tensor, baselines: dict[str, torch.Tensor]) -> dict:
    """ROC-AUC and PR-AUC of the router's scores and of each single-signal baseline (higher = route), on the
    same rows."""
    out = {"router": {"roc_auc": roc_auc(scores, divergent), "pr_auc": pr_auc(scores, divergent)}}
    for name, baseline in baselines.items():
        out[name] = {"roc_auc": roc_auc(baseline, divergent), "pr_auc": pr_auc(baseline, divergent)}
    return out


def train_router(dataset_dir: str | Path, out_dir: str | Path, settings: TrainSettings | None = None,
                 progress: bool = True) -> TrainResult:
    """The whole recipe on a finished label dataset; writes the checkpoint to out_dir."""
    from collab_decode.labels.dataset import read_dataset

    settings = settings or TrainSettings()
    data = read_dataset(dataset_dir)
    layout = data.manifest["features"]
    hidden_size, top_k = layout["hidden_size"], layout["top_k"]
    features = data.tensors["features"]
    if settings.prompt_lookup:
        if "lookup" not in data.tensors:
            raise ValueError(f"{dataset_dir} has no prompt lookup columns (labelled before they existed): label "
                             "it again, or train without --prompt-lookup")
        features = torch.cat([features.float(), data.tensors["lookup"].float()], dim=-1)
    divergent, usable = data.targets()
    train, val = data.split_by_query(settings.val_fraction, settings.seed)
    train, val = train & usable, val & usable
    model, log = fit(features, divergent, train, val, hidden_size, top_k, settings, progress)
    top1 = _top1_prob(data, features, layout)
    gate = confidence_gate(top1[train], divergent[train])
    scores = torch.where(top1[val] < gate, predict(model, features[val]), 0.0)  # what the online router scores
    metrics = evaluate(scores, divergent[val], _baselines(data, features, layout, val))
    table = calibration_table(scores, divergent[val])
    chosen = threshold_for_recall(table, settings.recall_target)
    config = {
        "hidden_size": hidden_size, "top_k": top_k, "width": settings.width, "num_layers": settings.num_layers,
        "prompt_lookup": settings.prompt_lookup, "threshold": chosen["threshold"],
        "recall_target": settings.recall_target, "gate": gate,
        "gate_pass_fraction": float((top1[val] < gate).double().mean()),
        "calibration": table, "metrics": metrics,
        "pair": {"fingerprint": data.manifest["pair"]["fingerprint"]},
        "data": {"dataset": str(dataset_dir), "num_rows": int(usable.sum()), "num_train_rows": int(train.sum()),
                 "num_val_rows": int(val.sum()), "divergent_fraction": float(divergent[usable].mean())},
        "training": {**asdict(settings), **log},
    }
    save_router(out_dir, model, config)
    return TrainResult(model, config)


def confidence_gate(top1: torch.Tensor, divergent: torch.Tensor) -> float:
    """The small model's top-1 probability at or above which the router never routes (and never runs):
    halfway between the most confident divergent training position and certainty."""
    most_confident = float(top1[divergent.bool()].max()) if divergent.any() else 0.0
    return (1.0 + most_confident) / 2


def _top1_prob(data, features: torch.Tensor, layout: dict) -> torch.Tensor:
    """(N,) the small model's top-1 probability: the dataset's full-vocabulary column where it has one, else
    a softmax over the features' top-k logits (an upper bound, so a gate from it only lets more rows through)."""
    if "top1_prob" in data.tensors:
        return data.tensors["top1_prob"].float()
    lo, hi = layout["layout"]["top_k_logits"]
    return torch.softmax(features[:, lo:hi].float(), -1)[:, 0]


def _baselines(data, features: torch.Tensor, layout: dict, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Single signals on `rows`, oriented so that higher routes: from the dataset's full-vocabulary columns
    where it has them, else from the features' top-k logits."""
    t = data.tensors
    if all(name in t for name in ("entropy", "top1_prob", "top2_margin")):
        return {"entropy": t["entropy"][rows].double(), "top1_prob": 1 - t["top1_prob"][rows].double(),
                "top2_margin": -t["top2_margin"][rows].double()}
    lo, hi = layout["layout"]["top_k_logits"]
    return baseline_scores(features[rows][:, lo:hi].float())


def describe(config: dict) -> str:
    """A short text report of a trained router's metrics against the baselines."""
    lines = [f"{'signal':12} {'ROC-AUC':>8} {'PR-AUC':>8}"]
    for name, m in config["metrics"].items():
        lines.append(f"{name:12} {m['roc_auc']:8.4f} {m['pr_auc']:8.4f}")
    share = next(r["large_share"] for r in config["calibration"] if r["threshold"] == config["threshold"])
    lines.append(f"threshold {config['threshold']:.4g}: recall >= {config['recall_target']} at large share "
                 f"{share:.2%} (validation rows; divergent fraction {config['data']['divergent_fraction']:.2%})")
    if any(math.isnan(m["roc_auc"]) for m in config["metrics"].values()):
        lines.append("(nan: the validation rows hold one class only)")
    return "\n".join(lines)
