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
        return self.net(features).squeeze(-1)  # (B,) logits


@dataclass
class LoadedRouter:
    """A router checkpoint in memory: the MLP and its config.json."""

    model: RouterMLP
    config: dict


def load_router(path: str | Path, hidden_size: int | None = None) -> LoadedRouter:
    """Load a router checkpoint; ValueError if it is not one, or was trained for another hidden size."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"{path} is not a router checkpoint (needs config.json and model.safetensors)")
    config = json.loads(config_file.read_text())
    if hidden_size is not None and config["hidden_size"] != hidden_size:
        raise ValueError(f"router {path} expects hidden size {config['hidden_size']}, the small model has "
                         f"{hidden_size}: it was trained for another pair")
    model = RouterMLP(config["hidden_size"], config["top_k"], config.get("width", 256), config.get("num_layers", 2))
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ValueError(f"router checkpoint {path} does not match its config: {e}") from None
    return LoadedRouter(model.eval().requires_grad_(False), config)


def save_router(path: str | Path, model: RouterMLP, config: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))


class NeuralRoute(Router):
    def __init__(self, router: LoadedRouter, threshold: float | None = None):
        self.model = router.model
        self.threshold = router.config.get("threshold", 0.5) if threshold is None else threshold

    @classmethod
    def from_spec(cls, spec, context: RouterContext) -> "NeuralRoute":
        if not context.routers:
            raise ValueError("no neural router is loaded: start with --router NAME=PATH")
        name = spec.router or next(iter(context.routers))
        if name not in context.routers:
            raise ValueError(f"router {name!r} is not loaded here; routers: {', '.join(context.routers)}")
        return cls(context.routers[name], spec.threshold)

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        """(B,) probability that each position is divergent."""
        feats = router_features(inputs.hidden, inputs.embed(inputs.proposed), inputs.logits, self.model.top_k)
        return torch.sigmoid(self.model(feats))

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return self.scores(inputs) > self.threshold
