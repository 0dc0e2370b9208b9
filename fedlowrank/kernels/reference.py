"""Torch paths of the grouped low-rank op (plain matmuls).

Two things live here:

* ``reference_delta`` / ``reference_linear``: the op in plain torch autograd. Used
  under functorch transforms (Opacus per-sample gradients) and when forced with
  ``backend="reference"``; also what the Triton kernels are checked against. Same
  order as the kernels: shrink ``h = x V``, scale each row by its sample's
  ``scale * s_row`` (on the rank-r side, not M x d_out), expand with ``U``, added into
  the base output with ``addmm``.
* ``skinny`` / ``expand``: torch versions of the two Triton primitives, so the fused
  autograd Function in :mod:`fedlowrank.kernels.op` runs on CPU too (the default
  ``"torch"`` path there).

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


# Torch versions of the two Triton primitives (same signatures as
# :mod:`fedlowrank.kernels.triton_lowrank`), so the autograd Function with the
# hand-written backward also runs on CPU: it keeps only rank-r intermediates and adds
# the expand into the base output (and dh V^T into g W0) in place.
PLAIN, SHRINK, GRAD = 0, 1, 2


def _per_row(srow: torch.Tensor, acc: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    if rows_per_sample == 1:
        return acc * srow
    rank = acc.shape[1]
    return (acc.view(-1, rows_per_sample, rank) * srow[:, None, :]).view(-1, rank)


def skinny(
    a: torch.Tensor,
    b: torch.Tensor,
    out1: torch.Tensor,
    *,
    alpha: float = 1.0,
    epilogue: int = PLAIN,
    out2: torch.Tensor | None = None,
    srow: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    rows_per_sample: int = 1,
    splits: int | None = None,
) -> None:
    """Torch ``out1 (P x r) <- epilogue(a @ b)``; see ``triton_lowrank.skinny``."""
    del splits  # one BLAS call reduces the whole of Q
    acc = (a @ b).to(torch.promote_types(a.dtype, torch.float32))
    if epilogue == PLAIN:
        out1.copy_(acc * alpha)
        return
    scaled = _per_row(srow.to(acc.dtype), acc, rows_per_sample) * alpha
    if epilogue == SHRINK:
        out1.copy_(acc)
        out2.copy_(scaled)
    else:
        out1.copy_(scaled)
        out2.copy_(acc * h * alpha)


def expand(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, accumulate: bool) -> None:
    """Torch ``c (+)= a @ b^T``; see ``triton_lowrank.expand``."""
    if accumulate:
        c.addmm_(a, b.T)
    else:
        torch.mm(a, b.T, out=c)
