"""SVD-factored adapter around a frozen ``nn.Linear`` (attention and MLP linears included).

The forward never forms ``dW``: it shrinks ``x`` to rank ``r`` with ``V``, scales each
row by its group's singular values, and expands with ``U``, in one fused op with the
base layer (Triton on CUDA, the torch reference elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import lowrank_delta, lowrank_linear
from .base import SVDAdapter, register_adapter


@register_adapter(nn.Linear)
class SVDLinear(SVDAdapter):
    """A frozen ``nn.Linear`` plus an SVD-factored adapter (see :class:`SVDAdapter`).

    Parameters
    ----------
    base : nn.Linear
        The layer to adapt.
    rank, groups, alpha
        As for :class:`SVDAdapter`.
    """

    def __init__(self, base: nn.Linear, rank: int, groups: int = 1, alpha: float | None = None) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SVDLinear wraps nn.Linear, got {type(base).__name__}")
        d_out, d_in = base.weight.shape
        super().__init__(base, d_out, d_in, rank, groups, alpha)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * ((x V) * S[g]) U^T`` without forming ``U diag(S) V^T``."""
        return lowrank_delta(x, self.lora_U, self.lora_S, self.lora_V, self.scale, self._routing())

    def delta_weight(self, group: int | None = None) -> torch.Tensor:
        return self.delta_matrix(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op for base + adapter: the expand accumulates into the base output,
        # which halves the layer's peak activation memory against base(x) + delta(x).
        out = lowrank_linear(
            x, self.base.weight, self.base.bias, self.lora_U, self.lora_S, self.lora_V, self.scale, self._routing()
        )
        if self.fold_U.shape[1]:
            out = out + (x.to(self.fold_V.dtype) @ self.fold_V) @ self.fold_U.T
        return out
