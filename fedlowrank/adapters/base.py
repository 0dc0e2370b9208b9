"""What every SVD-factored adapter shares, and the registry of adapters by base layer type.

An adapter wraps a frozen base layer whose weight, read as a matrix, is ``d_out x d_in``
(a conv kernel flattened over input channels and kernel positions) and adds
``dW_g = scale * U diag(S[g]) V^T`` with ``U`` (d_out x r), ``V`` (d_in x r) shared and
``S`` (G x r) holding one row of singular values per demographic group. Subclasses say
how the factors act on their layer's input (never forming ``dW``) and how ``dW`` is laid
out in the base weight; everything else (groups, routing, folds, the wire state) is here
and in :mod:`fedlowrank.adapters.state`, the same for every layer type.

A new layer type plugs in with :func:`register_adapter`, as codecs and rules do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

UNKNOWN_GROUP = -1
"""Group id for samples whose group is not known (uses the group-share-weighted S)."""

_ADAPTERS: dict[str, type[SVDAdapter]] = {}


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(*base_types: type | str) -> Callable[[type[SVDAdapter]], type[SVDAdapter]]:
    """Class decorator: ``cls`` adapts layers of ``base_types`` (and their subclasses).

    A type may be given by its dotted name (``"transformers.pytorch_utils.Conv1D"``) so
    that registering it does not import an optional package.
    """

    def decorator(cls: type[SVDAdapter]) -> type[SVDAdapter]:
        for base_type in base_types:
            name = base_type if isinstance(base_type, str) else _type_name(base_type)
            if name in _ADAPTERS and _ADAPTERS[name] is not cls:
                raise ValueError(f"base layer type {name} already has the adapter {_ADAPTERS[name].__name__}")
            _ADAPTERS[name] = cls
        return cls

    return decorator


def adapter_class_for(module: nn.Module) -> type[SVDAdapter] | None:
    """The adapter class registered for ``module``'s type (nearest in its MRO), or None."""
    if isinstance(module, SVDAdapter):
        return None
    for cls in type(module).__mro__:
        found = _ADAPTERS.get(_type_name(cls))
        if found is not None:
            return found
    return None


def adaptable_types() -> list[str]:
    """Dotted names of the base layer types that take an adapter."""
    return sorted(_ADAPTERS)


class SVDAdapter(nn.Module):
    """A frozen base layer plus an SVD-factored, optionally grouped, adapter.

    Parameters
    ----------
    base : nn.Module
        The layer to adapt. Its parameters are frozen.
    d_out, d_in : int
        The base weight's shape read as a matrix (set by the subclass).
    rank : int
        Adapter rank ``r``; must not exceed ``min(d_in, d_out)``.
    groups : int (default: 1)
        Number of rows of singular values ``G``.
    alpha : float, optional
        LoRA scaling numerator; ``scale = alpha / rank``. Defaults to ``rank`` (scale 1).

    Notes
    -----
    Initialisation follows LoRA: ``U = 0`` so the adapted model starts equal to the
    base, ``V`` Kaiming-uniform so gradients reach ``U`` at once, ``S = 1``. Group
    membership is set per batch with :func:`fedlowrank.adapters.group_context`; without
    it every sample uses the group-share-weighted mean of ``S`` (``S[0]`` when G = 1).
    """

    def __init__(self, base: nn.Module, d_out: int, d_in: int, rank: int, groups: int = 1, alpha: float | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(d_in, d_out):
            raise ValueError(
                f"adapter rank {rank} must be between 1 and min(d_in, d_out) = "
                f"{min(d_in, d_out)} for a {d_in}->{d_out} {type(base).__name__}"
            )
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.base = base
        for param in self.base.parameters():
            param.requires_grad_(False)
        self.d_out, self.d_in = d_out, d_in
        self.rank = rank
        self.groups = groups
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        weight = next(base.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
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
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    def row_singular_values(self, batch_size: int) -> torch.Tensor:
        """Singular values for each sample of the batch, shape (batch, r).

        Uses the group weights set by ``group_context``: one-hot for hard ids, any
        convex combination for soft assignment, ``group_share`` for unknown samples.
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
        """Per-sample group weights in effect, else the group-share mix (None when G = 1)."""
        if self.group_weights is not None or self.groups == 1:
            return self.group_weights
        return self.group_share

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

    def delta_matrix(self, group: int | None = None) -> torch.Tensor:
        """Dense ``dW`` (d_out x d_in) of one group (default: the group-share mix), plus the fold.

        For tests, merging and export only: the forward never forms it.
        """
        s = self.lora_S[group] if group is not None else self.row_singular_values(1)[0]
        dense = self.scale * (self.lora_U * s) @ self.lora_V.T
        return dense + self.fold_U @ self.fold_V.T

    def delta_weight(self, group: int | None = None) -> torch.Tensor:
        """``dW`` laid out like the base weight (what a merge adds to it); each layer type says how."""
        raise NotImplementedError(f"{type(self).__name__} must define delta_weight: the layout of dW in its base weight")

    def extra_repr(self) -> str:
        return f"rank={self.rank}, groups={self.groups}, scale={self.scale:g}"
