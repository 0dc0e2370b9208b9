"""SVD-factored adapter around GPT-2 style ``Conv1D`` (``transformers.pytorch_utils.Conv1D``).

``Conv1D`` is a linear layer whose weight is stored transposed, (d_in x d_out), with
``y = x W + b`` (PEFT's ``fan_in_fan_out``). The adapter's factors keep the usual
meaning (``dW`` maps d_in -> d_out), so its wire state is the same as for
``nn.Linear``; only :meth:`delta_weight` is laid out the base's way. Registered by name,
so transformers is imported only by users who have such a model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import lowrank_delta
from .base import SVDAdapter, register_adapter


@register_adapter("transformers.pytorch_utils.Conv1D")
class SVDConv1D(SVDAdapter):
    """A frozen GPT-2 ``Conv1D`` (weight d_in x d_out) plus an SVD-factored adapter.

    Parameters
    ----------
    base : transformers.pytorch_utils.Conv1D
        The layer to adapt (any module with ``weight`` (d_in x d_out), ``bias`` and
        ``nf`` = d_out).
    rank, groups, alpha
        As for :class:`~fedlowrank.adapters.base.SVDAdapter`.
    """

    def __init__(self, base: nn.Module, rank: int, groups: int = 1, alpha: float | None = None) -> None:
        weight = getattr(base, "weight", None)
        if weight is None or weight.dim() != 2 or getattr(base, "nf", None) != weight.shape[1]:
            raise TypeError(f"SVDConv1D wraps a GPT-2 Conv1D (weight d_in x d_out, nf = d_out), got {type(base).__name__}")
        d_in, d_out = weight.shape
        super().__init__(base, d_out, d_in, rank, groups, alpha)

    def delta_weight(self, group: int | None = None) -> torch.Tensor:
        return self.delta_matrix(group).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x) + lowrank_delta(x, self.lora_U, self.lora_S, self.lora_V, self.scale, self._routing())
        if self.fold_U.shape[1]:
            out = out + (x.to(self.fold_V.dtype) @ self.fold_V) @ self.fold_U.T
        return out
