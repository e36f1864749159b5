"""The neural router (R2R-style): an MLP over the small model's view of a position.

Features per position: [last-layer hidden state, input embedding of the proposed token, top-k
logits sorted descending]. Output: a logit; sigmoid(logit) > threshold routes the token to the large
model. A checkpoint is a directory with `config.json` (sizes, the pair it was trained for, the
calibrated threshold and calibration table) and `model.safetensors`: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from collab_decode.routing.policies import RouterInputs, RoutingPolicy


class RouterMLP(nn.Module):
    def __init__(self, hidden_size: int, top_k: int, width: int = 256, num_layers: int = 2):
        super().__init__()
        self.top_k = top_k
        dims = [2 * hidden_size + top_k] + [width] * num_layers
        layers: list[nn.Module] = [nn.LayerNorm(dims[0])]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)

    def features(self, hidden: torch.Tensor, token_embedding: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(B, H), (B, H), (B, V) -> (B, 2H + k)."""
        top = torch.topk(logits.float(), self.top_k, dim=-1).values  # sorted descending
        return torch.cat([hidden.float(), token_embedding.float(), top], dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)  # (B,) logits


def load_router(path: str | Path) -> tuple[RouterMLP, dict]:
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"{path} is not a router checkpoint (needs config.json and model.safetensors)")
    config = json.loads(config_file.read_text())
    model = RouterMLP(config["hidden_size"], config["top_k"], config.get("width", 256), config.get("num_layers", 2))
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ValueError(f"router checkpoint {path} does not match its config: {e}") from None
    return model.eval().requires_grad_(False), config


def save_router(path: str | Path, model: RouterMLP, config: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))


class NeuralRoute(RoutingPolicy):
    name = "neural"

    def __init__(self, path: str, threshold: float | None = None, hidden_size: int | None = None):
        self.model, self.router_config = load_router(path)
        if hidden_size is not None and self.router_config["hidden_size"] != hidden_size:
            raise ValueError(f"router {path} expects hidden size {self.router_config['hidden_size']}, "
                             f"the small model has {hidden_size}: it was trained for another pair")
        self.threshold = self.router_config.get("threshold", 0.5) if threshold is None else threshold
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"neural threshold must be in [0, 1], got {self.threshold}")

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        """(B,) probability that each position is divergent."""
        feats = self.model.features(inputs.hidden, inputs.embed(inputs.proposed), inputs.logits)
        return torch.sigmoid(self.model(feats))

    def decide(self, inputs: RouterInputs) -> torch.Tensor:
        return self.scores(inputs) > self.threshold
