"""The neural router (R2R-style): an MLP over the router features of a position (routing/features.py).

Output: a logit; sigmoid(logit) > threshold routes the token to the large model. A checkpoint is a
directory with `config.json` (sizes, the pair it was trained for, the calibrated threshold and
calibration table) and `model.safetensors`: no pickle. Engines load the routers they are started with
(`load_router`) and requests name them; a router for another pair (hidden size) is refused at load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from collab_decode.routing.features import feature_size, router_features
from collab_decode.routing.policies import Router, RouterContext, RouterInputs


class RouterMLP(nn.Module):
    def __init__(self, hidden_size: int, top_k: int, width: int = 256, num_layers: int = 2):
        super().__init__()
        self.top_k = top_k
        dims = [feature_size(hidden_size, top_k)] + [width] * num_layers
        layers: list[nn.Module] = [nn.LayerNorm(dims[0])]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Functional calls over the layers' parameters: at batch 1 the modules' __call__ overhead would cost
        # more than the arithmetic. Same parameters and state-dict keys as self.net.
        x = features
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                x = F.linear(x, layer.weight, layer.bias)
            elif isinstance(layer, nn.LayerNorm):
                x = F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
            else:
                x = F.gelu(x)
        return x.squeeze(-1)  # (B,) logits


def top1_prob(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) probability of the most likely token (softmax + max: at batch 1 a third of
    exp(max - logsumexp)'s time, measured)."""
    return torch.softmax(logits, -1).amax(-1)


@dataclass
class LoadedRouter:
    """A router checkpoint in memory: the MLP and its config.json."""

    model: RouterMLP
    config: dict


def load_router(path: str | Path, hidden_size: int | None = None, fingerprint: str | None = None) -> LoadedRouter:
    """Load a router checkpoint. ValueError, naming the problem, if it is not one, is corrupted or truncated,
    or was trained for another pair (hidden size, or the pair fingerprint it records)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"{path} is not a router checkpoint (needs config.json and model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
        sizes = (int(config["hidden_size"]), int(config["top_k"]), int(config.get("width", 256)),
                 int(config.get("num_layers", 2)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"router {config_file} is not a valid router config: {e!r}") from None
    if hidden_size is not None and sizes[0] != hidden_size:
        raise ValueError(f"router {path} expects hidden size {sizes[0]}, the small model has "
                         f"{hidden_size}: it was trained for another pair")
    trained_for = config.get("pair", {}).get("fingerprint")
    if fingerprint is not None and trained_for is not None and trained_for != fingerprint:
        raise ValueError(f"router {path} was trained for another pair (fingerprint {trained_for[:19]}..., "
                         f"this pair's is {fingerprint[:19]}...)")
    model = RouterMLP(*sizes)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"router weights {weights} are corrupted or truncated: {e}") from None
    except RuntimeError as e:
        raise ValueError(f"router checkpoint {path} does not match its config: {e}") from None
    return LoadedRouter(model.eval().requires_grad_(False), config)


def threshold_for_share(table: list[dict], large_share: float) -> float:
    """From a calibration table (rows of threshold, recall, large_share): the lowest threshold whose large
    share stays within the budget (the highest threshold when none does)."""
    within = [row for row in table if row["large_share"] <= large_share]
    row = min(within, key=lambda r: r["threshold"]) if within else max(table, key=lambda r: r["threshold"])
    return row["threshold"]


def save_router(path: str | Path, model: RouterMLP, config: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))


class NeuralRoute(Router):
    def __init__(self, router: LoadedRouter, threshold: float | None = None, large_share: float | None = None):
        self.model = router.model
        if large_share is not None:
            table = router.config.get("calibration")
            if not table:
                raise ValueError("this router has no calibration table: ask for a threshold, not a large_share")
            threshold = threshold_for_share(table, large_share)
        self.threshold = router.config.get("threshold", 0.5) if threshold is None else threshold
        # Positions where the small model's top-1 probability reaches the gate are never routed and skip the
        # MLP (the trainer sets the gate above every divergent training position; None: no gate)
        self.gate = router.config.get("gate")

    @classmethod
    def from_spec(cls, spec, context: RouterContext) -> "NeuralRoute":
        if not context.routers:
            raise ValueError("no neural router is loaded: start with --router NAME=PATH")
        name = spec.router or next(iter(context.routers))
        if name not in context.routers:
            raise ValueError(f"router {name!r} is not loaded here; routers: {', '.join(context.routers)}")
        return cls(context.routers[name], spec.threshold, spec.large_share)

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        """(B,) probability that each position is divergent; 0 where the gate says the small model is sure."""
        out = inputs.logits.new_zeros(len(inputs.states))
        rows = self.uncertain_rows(inputs)
        if rows:
            out[rows] = torch.sigmoid(self.model(self.features(inputs if len(rows) == len(out) else
                                                               inputs.select(rows))))
        return out

    def uncertain_rows(self, inputs: RouterInputs) -> list[int]:
        """The rows the MLP scores: those whose top-1 probability is below the gate (all rows without one).
        One host copy of B flags; the MLP does not run when no row is uncertain (most steps at batch 1)."""
        if self.gate is None:
            return list(range(len(inputs.states)))
        return [i for i, uncertain in enumerate((top1_prob(inputs.logits) < self.gate).tolist()) if uncertain]

    def features(self, inputs: RouterInputs) -> torch.Tensor:
        return router_features(inputs.hidden, inputs.embed(inputs.proposed), inputs.logits, self.model.top_k)

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return self.scores(inputs) > self.threshold
