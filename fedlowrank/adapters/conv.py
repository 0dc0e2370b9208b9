"""SVD-factored adapter around a frozen ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

The kernel (c_out, c_in, *k) read as a matrix is ``d_out = c_out`` by
``d_in = c_in * prod(k)`` (PyTorch's own flattening order), so the factors and the wire
state are those of a linear layer. The forward never forms the dense kernel update:
it shrinks with a rank-``r`` convolution whose kernel is ``V^T`` reshaped (same stride,
padding, dilation as the base), scales each sample's ``r`` channels by its group's
singular values, and expands with ``U`` as a 1x1 convolution.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import SVDAdapter, register_adapter


@register_adapter(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class SVDConv(SVDAdapter):
    """A frozen convolution plus an SVD-factored adapter on its reshaped kernel.

    Parameters
    ----------
    base : nn.Conv1d, nn.Conv2d or nn.Conv3d
        The layer to adapt. Grouped or depthwise convolutions (``groups > 1``) are
        refused: their kernel is block-diagonal, not one matrix.
    rank, groups, alpha
        As for :class:`~fedlowrank.adapters.base.SVDAdapter` (``groups`` there means
        demographic groups).
    """

    def __init__(self, base: nn.Module, rank: int, groups: int = 1, alpha: float | None = None) -> None:
        if not isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"SVDConv wraps nn.Conv1d/2d/3d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(
                f"SVDConv needs a dense convolution; this {type(base).__name__} has groups = {base.groups} "
                "(grouped/depthwise kernels are block-diagonal): leave it out of target_modules"
            )
        c_out, c_in, *kernel = base.weight.shape
        super().__init__(base, c_out, c_in * math.prod(kernel), rank, groups, alpha)

    def _shrink(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x`` convolved with ``v^T`` reshaped as a (width, c_in, *k) kernel: (N, width, *out)."""
        kernel = v.T.reshape(v.shape[1], *self.base.weight.shape[1:])
        return self.base._conv_forward(x, kernel.to(x.dtype), None)

    @staticmethod
    def _expand(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A 1x1 convolution with ``u`` (c_out x width): (N, width, *out) -> (N, c_out, *out)."""
        return torch.einsum("nr...,or->no...", h, u.to(h.dtype))

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * U diag(S[g]) V^T`` applied as conv-shrink, per-sample scale, 1x1 expand."""
        batched = x.dim() == self.base.weight.dim()
        xb = x if batched else x.unsqueeze(0)
        h = self._shrink(xb, self.lora_V)
        s = self.row_singular_values(xb.shape[0]) * self.scale
        h = h * s.to(h.dtype).reshape(*s.shape, *([1] * (h.dim() - 2)))
        out = self._expand(h, self.lora_U)
        return out if batched else out.squeeze(0)

    def delta_weight(self, group: int | None = None) -> torch.Tensor:
        return self.delta_matrix(group).reshape(self.base.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x) + self.adapter_delta(x)
        if self.fold_U.shape[1]:
            batched = x.dim() == self.base.weight.dim()
            xb = x if batched else x.unsqueeze(0)
            fold = self._expand(self._shrink(xb.to(self.fold_V.dtype), self.fold_V), self.fold_U)
            out = out + (fold if batched else fold.squeeze(0)).to(out.dtype)
        return out
