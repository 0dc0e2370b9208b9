"""Route each sample of a batch to its group's row of singular values."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .base import UNKNOWN_GROUP, SVDAdapter


def group_weights_from_ids(
    group_ids: torch.Tensor,
    groups: int,
    own_weight: float = 1.0,
    group_share: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn group ids into per-row mixing weights over the G rows of ``S``.

    Parameters
    ----------
    group_ids : torch.Tensor
        Integer tensor of shape (batch,), values in ``0..groups-1`` or
        ``UNKNOWN_GROUP`` (-1).
    groups : int
        Number of groups ``G``.
    own_weight : float (default: 1.0)
        Weight on the sample's own group; the rest ``1 - own_weight`` is spread evenly
        over the other groups (FairFedMed's soft assignment). 1.0 is hard one-hot.
    group_share : torch.Tensor, optional
        Weights for unknown rows (default: uniform).

    Returns
    -------
    torch.Tensor
        Float tensor (batch, groups) whose rows sum to one.
    """
    if group_ids.dim() != 1:
        raise ValueError(f"group ids must be 1-D (batch,), got shape {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group ids must be an integer tensor, got dtype {group_ids.dtype}")
    bad = (group_ids < UNKNOWN_GROUP) | (group_ids >= groups)
    if bool(bad.any()):
        raise ValueError(
            f"group ids must be in 0..{groups - 1} (or {UNKNOWN_GROUP} for unknown); "
            f"found {sorted(set(group_ids[bad].tolist()))}"
        )
    if not 0.0 <= own_weight <= 1.0:
        raise ValueError(f"own_weight must be in [0, 1], got {own_weight}")
    known = group_ids >= 0
    others = (1.0 - own_weight) / (groups - 1) if groups > 1 else 0.0
    weights = torch.full((group_ids.shape[0], groups), others, dtype=torch.float32)
    if groups == 1:
        weights.fill_(1.0)
    else:
        rows = torch.nonzero(known).squeeze(1)
        weights[rows, group_ids[known]] = own_weight
    if group_share is None:
        group_share = torch.full((groups,), 1.0 / groups)
    weights[~known] = group_share.to(weights.dtype).cpu()
    return weights.to(group_ids.device)


@contextmanager
def group_context(
    model: nn.Module, group_ids: torch.Tensor, own_weight: float = 1.0
) -> Iterator[None]:
    """Run forwards (and backwards) of ``model`` with per-sample group routing.

    Every adapter layer (:class:`SVDAdapter`) inside ``model`` uses the rows of ``S`` selected by
    ``group_ids`` (see :func:`group_weights_from_ids`) until the context exits.
    """
    layers = [m for m in model.modules() if isinstance(m, SVDAdapter)]
    try:
        for layer in layers:
            weights = group_weights_from_ids(
                group_ids, layer.groups, own_weight, layer.group_share
            )
            layer.group_weights = weights.to(layer.lora_S.device)
        yield
    finally:
        for layer in layers:
            layer.group_weights = None
