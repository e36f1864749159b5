"""Layers the model files share: the CPU-tuned Linear and RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear, with the product on a CPU in float32 written the way decoding runs fastest there.

    A decode step multiplies each weight by a few rows (one per sequence), a catch-up chunk by a few
    more; PyTorch's default CPU product (`x @ W.T`) is slow once rows x in_features passes a few
    thousand, while the same product with the operands swapped, `(W @ x.T).T`, is slow below that.
    Measured on this project's 2-core machine (best of 400 calls, the four weights of one layer, 2 threads):
      - 256 wide (the demo large model): rows 2: 35 us `x @ W.T` against 121 swapped; 8: 69 / 122;
        16: 143 / 116; 32: 197 / 165; 64: about equal (316 / 344).
      - 512 wide (a 20M model): rows 2: 230 / 415; 4: 363 / 409; 8: 498 / 436; 16: 802 / 410.
      So the swapped product from SWAP_MIN_ELEMENTS = rows x in_features up (16 rows at 256, 8 at 512).
      - 1 row inside torch.compile: as a sum of products, which the compiler turns into one fused pass
        over the weight; 5.3 instead of 11.9 ms on the 20M model. Eagerly this would build W * x in memory,
        and the swapped product is no faster at 1 row, so one row outside torch.compile stays `x @ W.T`.
    Elsewhere (CUDA, other dtypes) it is nn.Linear unchanged.

    Better still is the weight stored transposed (`pack`, which the loader calls): `(in, out)` in memory, so
    `x @ W.T` reads a contiguous matrix (no transposed operand for the BLAS). Measured the same way (1 thread,
    best of 5 x 300 calls, us; `x @ W.T` / swapped / packed):
      - 1536 x 256 (the large model's gate+up): rows 1: 25.1 / 27.4 / 15.4; 4: 37.0 / 82.0 / 32.4;
        16: 110 / 80.3 / 69.1; 33: 176 / 188 / 152; 64: 285 / 252 / 243.
      - 256 x 768 (its down projection): rows 1: 11.1 / 12.2 / 6.7; 16: 52.9 / 39.4 / 29.4; 33: 87.9 / 97.5 / 64.5.
      - Only 2-3 rows favour the plain product (1536 x 256, 2 rows: 19.9 against 24.2 packed).
    A tied output layer stays as it is: its weight is the embedding table, which lookups read by row.
    """

    SWAP_MIN_ELEMENTS = 4096  # rows x in_features from which `(W @ x.T).T` beats `x @ W.T` (measured above)
    packed = False  # the weight is stored (in, out) (pack); a plain attribute: read on every call

    def pack(self) -> None:
        """Store the weight as (in, out) in memory; the parameter keeps its (out, in) shape, as a view. Only
        for float32 on a CPU, where it was measured."""
        w = self.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() and w.dim() == 2:
            self.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
            self.packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
            return super().forward(x)
        if self.packed:  # (a packed weight is float32 on the CPU, as x is here); compiled too: the sum of
            # products below, over a packed weight, ran the compiled large model at 332 tokens/s against 589
            y = torch.mm(x, self.weight.t())  # (rows, out): the (in, out) storage, read as it lies
        elif x.shape[0] == 1 and torch.compiler.is_compiling():
            y = (self.weight * x).sum(dim=-1)[None]  # (1, out)
        elif x.shape[0] * x.shape[1] < self.SWAP_MIN_ELEMENTS:
            return super().forward(x)
        else:
            y = torch.mm(self.weight, x.t()).t()  # (rows, out), a transposed view
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op instead of three (the same products: x * rsqrt(...) * weight)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in float32 (as transformers does), scale in the model's dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
