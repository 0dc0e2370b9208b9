"""SVD-factored low-rank adapter around a frozen ``nn.Linear``.

The adapter adds ``dW_g = scale * U diag(S[g]) V^T`` to the frozen weight, with ``U``
(d_out x r) and ``V`` (d_in x r) shared and ``S`` (G x r) holding one row of singular
values per demographic group. The forward never forms ``dW``: it shrinks ``x`` to
rank ``r`` with ``V``, scales each row by its group's singular values, and expands with
``U``. G = 1 is a plain SVD-factored LoRA (PEFT's ``B = U diag(s)``, ``A = V^T``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import lowrank_delta, lowrank_linear

UNKNOWN_GROUP = -1
"""Group id for samples whose group is not known (uses the group-share-weighted S)."""


class SVDLinear(nn.Module):
    """A frozen ``nn.Linear`` plus an SVD-factored, optionally grouped, adapter.

    Parameters
    ----------
    base : nn.Linear
        The layer to adapt. Its parameters are frozen.
    rank : int
        Adapter rank ``r``; must not exceed ``min(d_in, d_out)``.
    groups : int (default: 1)
        Number of rows of singular values ``G``.
    alpha : float, optional
        LoRA scaling numerator; ``scale = alpha / rank``. Defaults to ``rank``
        (scale 1).

    Notes
    -----
    Initialisation follows LoRA: ``U = 0`` so the adapted model starts equal to the
    base, ``V`` Kaiming-uniform so gradients reach ``U`` at once, ``S = 1``.
    Group membership is set per batch with :func:`fedlowrank.adapters.group_context`;
    without it every row uses the group-share-weighted mean of ``S`` (``S[0]`` when
    G = 1).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        groups: int = 1,
        alpha: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SVDLinear wraps nn.Linear, got {type(base).__name__}")
        d_out, d_in = base.weight.shape
        if not 1 <= rank <= min(d_in, d_out):
            raise ValueError(
                f"adapter rank {rank} must be between 1 and min(d_in, d_out) = "
                f"{min(d_in, d_out)} for a {d_in}->{d_out} layer"
            )
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.base = base
        for param in self.base.parameters():
            param.requires_grad_(False)
        self.rank = rank
        self.groups = groups
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_U = nn.Parameter(torch.zeros(d_out, rank, **factory))
        self.lora_V = nn.Parameter(torch.empty(d_in, rank, **factory))
        self.lora_S = nn.Parameter(torch.ones(groups, rank, **factory))
        # Transposed view so the init matches PEFT's lora_A (r x d_in).
        nn.init.kaiming_uniform_(self.lora_V.data.T, a=math.sqrt(5))
        # Share of each group in the training data, used for unknown groups.
        self.register_buffer("group_share", torch.full((groups,), 1.0 / groups, **factory))
        # What the server folded into the frozen base (residual mode "fold", rule "flora"):
        # ``dW_fold = fold_U fold_V^T``, applied factored like the adapter, never trained.
        self.register_buffer("fold_U", torch.zeros(d_out, 0, **factory))
        self.register_buffer("fold_V", torch.zeros(d_in, 0, **factory))
        self.group_weights: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def row_singular_values(self, batch_size: int) -> torch.Tensor:
        """Singular values for each row of the batch, shape (batch, r).

        Uses the group weights set by ``group_context``: one-hot for hard ids,
        any convex combination for soft assignment, ``group_share`` for unknown rows.
        """
        if self.group_weights is None:
            mixed = self.group_share @ self.lora_S if self.groups > 1 else self.lora_S[0]
            return mixed.expand(batch_size, self.rank)
        if self.group_weights.shape != (batch_size, self.groups):
            raise ValueError(
                f"group weights have shape {tuple(self.group_weights.shape)}, expected "
                f"({batch_size}, {self.groups}) for this batch"
            )
        return self.group_weights.to(self.lora_S.dtype) @ self.lora_S

    def _routing(self) -> torch.Tensor | None:
        """Per-row group weights in effect, else the group-share mix (None when G = 1)."""
        if self.group_weights is not None or self.groups == 1:
            return self.group_weights
        return self.group_share

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * ((x V) * S[g]) U^T`` without forming ``U diag(S) V^T``.

        Runs :func:`fedlowrank.kernels.lowrank_delta` (fused Triton kernels on CUDA,
        the torch reference elsewhere).
        """
        return lowrank_delta(x, self.lora_U, self.lora_S, self.lora_V, self.scale, self._routing())

    def set_fold(self, fold_u: torch.Tensor, fold_v: torch.Tensor) -> None:
        """Replace the folded base correction ``fold_U fold_V^T`` (width 0 clears it)."""
        if fold_u.dim() != 2 or fold_v.dim() != 2 or fold_u.shape[1] != fold_v.shape[1]:
            raise ValueError(f"fold factors must be (d_out x f) and (d_in x f), got {tuple(fold_u.shape)}, {tuple(fold_v.shape)}")
        if fold_u.shape[0] != self.out_features or fold_v.shape[0] != self.in_features:
            raise ValueError(
                f"fold factors {tuple(fold_u.shape)} / {tuple(fold_v.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} layer"
            )
        factory = {"device": self.lora_U.device, "dtype": self.lora_U.dtype}
        self.fold_U = fold_u.detach().to(**factory).clone()
        self.fold_V = fold_v.detach().to(**factory).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op for base + adapter: the expand accumulates into the base output,
        # which halves the layer's peak activation memory against base(x) + delta(x).
        out = lowrank_linear(
            x, self.base.weight, self.base.bias, self.lora_U, self.lora_S, self.lora_V, self.scale, self._routing()
        )
        if self.fold_U.shape[1]:
            out = out + (x.to(self.fold_V.dtype) @ self.fold_V) @ self.fold_U.T
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, groups={self.groups}, scale={self.scale:g}"
