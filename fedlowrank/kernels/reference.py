"""Torch reference path of the grouped low-rank op (plain matmuls, torch autograd).

Used on CPU, when Triton is not importable, under functorch transforms (Opacus
per-sample gradients), or when forced. It computes the same thing as the Triton
kernels, in the same order: shrink ``h = x V``, scale each row by its sample's
``scale * s_row``, expand with ``U``. The scale is applied on the rank-r side (M x r,
not M x d_out), and the whole-layer form adds the expand into the base output with
``addmm`` so no extra M x d_out temporary is made.

Inputs are validated by :mod:`fedlowrank.kernels.op`; these functions assume shapes
that already agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _scaled_shrink(
    x2: torch.Tensor, V: torch.Tensor, s_rows: torch.Tensor, scale: float
) -> torch.Tensor:
    """``z = (x V) * scale * s_row`` for a flattened (M, d_in) input.

    ``s_rows`` is (batch, r) (or (1, r) for every row); the M = batch * T rows are
    sample-major, so a view to (batch, T, r) lines each row up with its sample.
    """
    h = x2 @ V
    rank = h.shape[1]
    row_scale = (s_rows * scale).to(h.dtype)
    batch = row_scale.shape[0]
    if batch == 1:
        return h * row_scale
    return (h.view(batch, -1, rank) * row_scale[:, None, :]).view(-1, rank)


def reference_delta(
    x2: torch.Tensor, U: torch.Tensor, s_rows: torch.Tensor, V: torch.Tensor, scale: float
) -> torch.Tensor:
    """Adapter output ``scale * ((x V) * s_row) U^T`` for a flattened input.

    Parameters
    ----------
    x2 : torch.Tensor
        Input rows (M, d_in), sample-major.
    U, V : torch.Tensor
        Factors (d_out, r) and (d_in, r).
    s_rows : torch.Tensor
        Singular values per sample (batch, r) or (1, r) for all rows.
    scale : float
        LoRA scale ``alpha / r``.

    Returns
    -------
    torch.Tensor
        (M, d_out).
    """
    return _scaled_shrink(x2, V, s_rows, scale) @ U.T


def reference_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    s_rows: torch.Tensor,
    V: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Whole layer ``x W0^T + b + scale * ((x V) * s_row) U^T`` for a flattened input.

    The expand is accumulated into the base output (``addmm``) rather than added
    afterwards. See :func:`reference_delta` for the other parameters.
    """
    z = _scaled_shrink(x2, V, s_rows, scale)
    return torch.addmm(F.linear(x2, weight, bias), z, U.T)
