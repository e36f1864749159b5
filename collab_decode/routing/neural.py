"""The neural router (R2R-style): an MLP over the router features of a position (routing/features.py).

Output: a logit; sigmoid(logit) > threshold routes the token to the large model. A checkpoint is a
directory with `config.json` (sizes, the pair it was trained for, the calibrated threshold and
calibration table) and `model.safetensors`: no pickle. Engines load the routers they are started with
(`load_router`) and requests name them; a router for another pair (hidden size) is refused at load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from collab_decode.routing.features import (LOOKUP_MAX_N, LOOKUP_TOP, PromptIndex, feature_size, lookup_features,
                                           router_features, top_probs, top_tokens)
from collab_decode.routing.policies import Router, RouterContext, RouterInputs
from collab_decode.sampling import _hostops, host_readable


class RouterMLP(nn.Module):
    def __init__(self, hidden_size: int, top_k: int, width: int = 256, num_layers: int = 2,
                 prompt_lookup: bool = False):
        super().__init__()
        self.top_k, self.prompt_lookup = top_k, prompt_lookup
        dims = [feature_size(hidden_size, top_k, prompt_lookup)] + [width] * num_layers
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
                x = gelu(x)
        return x.squeeze(-1)  # (B,) logits


SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x * Phi(x), written with erf: the same function as F.gelu (to float rounding), and
    cheaper per call on a CPU (F.gelu's kernel costs ~7 us on 64 values here, erf and the products ~3)."""
    return x * 0.5 * (1.0 + torch.erf(x * SQRT_HALF))


class FrozenRouterMLP:
    """A RouterMLP's function with its weights fixed, for serving, in as few ops as it allows (at batch 1 each op
    costs more than its arithmetic; right after a model's forward, ~8 us):
    - each Linear is one addmm over a transposed copy of its weight made once (F.linear transposes every call);
    - each GELU is two ops instead of five. With z = a / sqrt(2) for a pre-activation a, GELU(a) =
      (z + z * erf(z)) / sqrt(2): the 1 / sqrt(2) of z goes into the Linear before (its weight and bias), the one
      of the result into the Linear after (its weight), and the activation is addcmul(z, z, erf(z)).
    Same function as the layers' to float rounding (~1e-7 relative: tests/trainer/test_train.py)."""

    def __init__(self, model: RouterMLP):
        self.top_k, self.prompt_lookup = model.top_k, model.prompt_lookup
        norm, *layers = model.net
        weight, bias = norm.weight.detach().contiguous(), norm.bias.detach().contiguous()
        self.norm = (norm.normalized_shape, weight, bias, norm.eps)
        linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
        self.linears = []  # (weight transposed, bias), scaled as above
        for i, layer in enumerate(linears):
            into_gelu = i < len(linears) - 1
            scale_out = SQRT_HALF if into_gelu else 1.0  # its output is the next GELU's z
            scale_in = SQRT_HALF if i > 0 else 1.0  # its input is a GELU's z + z erf(z), sqrt(2) times GELU(a)
            weight = layer.weight.detach().t() * (scale_in * scale_out)
            self.linears.append((weight.contiguous(), (layer.bias.detach() * scale_out).contiguous()))
        self.host = self._host_stack()  # the same stack as _hostops.mlp reads it; None: torch ops only

    def _host_stack(self) -> tuple[tuple, list[tuple]] | None:
        """(norm, layers) for _hostops.mlp: the addresses of these tensors' memory (float32 on the CPU; they live as
        long as this object) and their sizes; None where the module was not built or the weights are elsewhere."""
        shape, weight, bias, eps = self.norm
        tensors = [weight, bias] + [t for linear in self.linears for t in linear]
        if _hostops is None or len(shape) != 1 or not all(t.is_cpu and t.dtype == torch.float32 for t in tensors):
            return None
        layers = [(w.data_ptr(), b.data_ptr(), w.shape[0], w.shape[1]) for w, b in self.linears]
        return (weight.data_ptr(), bias.data_ptr(), float(eps), shape[0]), layers

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(features, *self.norm)
        last = len(self.linears) - 1
        for i, (weight_t, bias) in enumerate(self.linears):
            x = torch.addmm(bias, x, weight_t)
            if i < last:
                x = torch.addcmul(x, x, torch.erf(x))  # sqrt(2) GELU(sqrt(2) x)
        return x.squeeze(-1)  # (B,) logits


@dataclass
class LoadedRouter:
    """A router checkpoint in memory: the MLP and its config.json."""

    model: RouterMLP
    config: dict
    frozen: FrozenRouterMLP = field(init=False)  # what routers run (the model's weights as loaded)

    def __post_init__(self):
        self.frozen = FrozenRouterMLP(self.model)


def load_router(path: str | Path, hidden_size: int | None = None, fingerprint: str | None = None,
                device: str | torch.device = "cpu") -> LoadedRouter:
    """Load a router checkpoint onto `device` (the small model's: the router reads its tensors there).
    ValueError, naming the problem, if it is not one, is corrupted or truncated, or was trained for another
    pair (hidden size, or the pair fingerprint it records)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"{path} is not a router checkpoint (needs config.json and model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
        sizes = (int(config["hidden_size"]), int(config["top_k"]), int(config.get("width", 256)),
                 int(config.get("num_layers", 2)), bool(config.get("prompt_lookup", False)))
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
    return LoadedRouter(model.to(device).eval().requires_grad_(False), config)


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


# From this many rows the gate sums exp(logits - max) with the sampler's max instead of softmax + max: over
# the demo vocabulary (447), 2.9 against 5.2 us at 1 row, 8.0 / 7.9 at 16, 23 / 15 at 64 (one thread, here)
EXP_SUM_FROM_ROWS = 16
# Up to this many uncertain rows the MLP and its features are computed on the host (_hostops: one C loop a row)
# where the inputs allow it (float32 on the CPU); from more, torch's batched ops (measured: docs/benchmarks.md,
# Session 17)
HOST_MAX_ROWS = 4


class NeuralRoute(Router):
    """Routes a position when sigmoid(MLP(features)) > threshold, decided on the host as MLP logit >
    logit(threshold). Per step: the gate over every row and the MLP over the uncertain ones, each read back
    once, and no other torch op (at batch 1 every op costs more than its arithmetic)."""

    def __init__(self, router: LoadedRouter, threshold: float | None = None, large_share: float | None = None):
        self.model = router.frozen
        if large_share is not None:
            table = router.config.get("calibration")
            if not table:
                raise ValueError("this router has no calibration table: ask for a threshold, not a large_share")
            threshold = threshold_for_share(table, large_share)
        self.threshold = router.config.get("threshold", 0.5) if threshold is None else threshold
        self._logit_threshold = _logit(self.threshold)
        # Positions where the small model's top-1 probability reaches the gate are never routed and skip the
        # MLP (the trainer sets the gate above every divergent training position; None: no gate): Router.gate
        self.gate = router.config.get("gate")
        self.reads_top1 = self.gate is not None
        # the largest logits the features read (and the prompt lookup's top tokens)
        self.num_top = max(self.model.top_k, LOOKUP_TOP) if self.model.prompt_lookup else self.model.top_k

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
            out[rows] = torch.sigmoid(torch.tensor(self._mlp_logits(inputs, rows), device=out.device))
        return out

    def uncertain_rows(self, inputs: RouterInputs) -> list[int]:
        """The rows the MLP scores: those whose top-1 probability is below the gate (all rows without one).
        One host copy of B floats (the MLP does not run when no row is uncertain: most steps at batch 1)."""
        if self.gate is None:
            return list(range(len(inputs.states)))
        if inputs.top1 is not None or inputs.row_max is None or len(inputs.states) < EXP_SUM_FROM_ROWS:
            return [i for i, p in enumerate(inputs.top1_probs()) if p < self.gate]  # (the sampler's, if it has them)
        # 1 / top-1 probability = sum(exp(logits - max logit)), from the max the sampler took
        mass = (inputs.logits - inputs.row_max[:, None]).exp_().sum(-1).tolist()
        return [i for i, m in enumerate(mass) if m * self.gate > 1.0]

    def new_state(self, seed: int | None = None) -> "_LookupState":
        return _LookupState()

    def features(self, inputs: RouterInputs) -> torch.Tensor:
        if not self.model.prompt_lookup:
            return router_features(inputs.hidden, inputs.embed(inputs.proposed), inputs.logits, self.model.top_k)
        top = torch.topk(inputs.logits, self.num_top, dim=-1)  # the features' and the lookup's
        return router_features(inputs.hidden, inputs.embed(inputs.proposed), inputs.logits, self.model.top_k,
                               self._lookup(inputs, top), top.values)

    @staticmethod
    def _lookup(inputs: RouterInputs, top) -> torch.Tensor:
        """(B, LOOKUP_SIZE): each row's prompt lookup (its sequence's prompt indexed on first use), from its
        largest logits (`top`: a topk of at least LOOKUP_TOP)."""
        _check_contexts(inputs)
        top_ids, probs = top_tokens(top.values, top.indices, inputs.top1_probs())
        rows = [_lookup_row(state, seq, ids, p) for state, seq, ids, p in zip(inputs.states, inputs.contexts, top_ids,
                                                                                probs)]
        return torch.tensor(rows, device=inputs.logits.device)

    def _mlp_logits(self, inputs: RouterInputs, rows: list[int]) -> list[float]:
        """The MLP's logit at each of these rows, on the host."""
        if len(rows) <= HOST_MAX_ROWS and self.model.host is not None and _host_readable(inputs, self.num_top):
            return self._host_logits(inputs, rows)
        selected = inputs if len(rows) == len(inputs.states) else inputs.select(rows)
        return self.model(self.features(selected)).tolist()

    def _host_logits(self, inputs: RouterInputs, rows: list[int]) -> list[float]:
        """`_mlp_logits` computed on the host (_hostops.mlp: the same stack as the torch ops')."""
        if self.model.prompt_lookup:
            _check_contexts(inputs)
        top1 = inputs.top1_probs() if self.model.prompt_lookup else None
        return _hostops.mlp([self._host_features(inputs, i, top1) for i in rows], *self.model.host)

    def _host_features(self, inputs: RouterInputs, row: int, top1: list[float] | None) -> list[float]:
        """One row's features as router_features concatenates them (its hidden state, its proposed token's
        embedding, its largest logits, and its prompt lookup from its top-1 probability `top1[row]`), on the host."""
        model, logits = self.model, inputs.logits
        ids, values = _hostops.top(_row_address(logits, row), 1, logits.shape[1], logits.stride(0), self.num_top)
        features = inputs.hidden[row].tolist() + inputs.embedding[inputs.proposed_ids[row]].tolist()
        features += values[0][:model.top_k]
        if model.prompt_lookup:
            probs = top_probs(values[0][:LOOKUP_TOP], top1[row])
            features += _lookup_row(inputs.states[row], inputs.contexts[row], ids[0][:LOOKUP_TOP], probs)
        return features

    def decide(self, inputs: RouterInputs) -> list[bool]:
        routed = [False] * len(inputs.states)
        rows = self.uncertain_rows(inputs)
        if rows:
            for i, z in zip(rows, self._mlp_logits(inputs, rows)):
                routed[i] = z > self._logit_threshold  # sigmoid(z) > threshold
        return routed


def _check_contexts(inputs: RouterInputs) -> None:
    if inputs.contexts is None:
        raise ValueError("this router looks its prompt up: its inputs must carry each row's sequence")


def _lookup_row(state: "_LookupState", seq, ids: list[int], probs: list[float]) -> list[float]:
    """One row's prompt lookup (its sequence's prompt indexed on first use) from its top tokens and their
    probabilities."""
    if state.index is None:
        state.index = PromptIndex(seq.prompt_ids)
    return lookup_features(state.index, seq.token_ids[-LOOKUP_MAX_N:], ids, probs)


def _host_readable(inputs: RouterInputs, num_top: int) -> bool:
    """The router's inputs can be read on the host: float32 logits on the CPU whose columns are contiguous (read
    from memory) with at least num_top of them, the embedding table, and the proposed tokens as ints."""
    logits = inputs.logits
    return (inputs.proposed_ids is not None and inputs.embedding is not None and host_readable(logits)
            and num_top <= min(_hostops.MAX_TOP, logits.shape[-1]))


def _row_address(matrix: torch.Tensor, row: int) -> int:
    """Where a float32 matrix's row starts in memory."""
    return matrix.data_ptr() + 4 * row * matrix.stride(0)


def _logit(p: float) -> float:
    """The z where sigmoid(z) = p (+-inf at 1 and 0)."""
    return math.inf if p >= 1 else -math.inf if p <= 0 else math.log(p / (1 - p))


class _LookupState:
    """A sequence's state under a neural router: its prompt's n-grams, built the first time the router looks
    one of its positions up (only routers trained with the prompt lookup do)."""

    __slots__ = ("index",)

    def __init__(self):
        self.index: PromptIndex | None = None
