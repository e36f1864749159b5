"""Layers the model files share: the CPU-tuned Linear and RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
