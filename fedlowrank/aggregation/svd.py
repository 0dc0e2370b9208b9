"""Exact weighted sum of SVD-factored client adapters, re-factored without dense d_out x d_in.

For clients ``k`` with ``(U_k, s_k, V_k)`` and weights ``w_k`` the target is
``M = sum_k w_k U_k diag(s_k) V_k^T``. Stack ``A = [U_1 .. U_K]`` and ``B = [V_1 .. V_K]``
(width ``K r``), factor ``A = Q_a R_a`` and ``B = Q_b R_b``; then
``M = Q_a (R_a D R_b^T) Q_b^T`` with ``D = blockdiag(w_k diag(s_k))``, and the SVD of the
small core gives the exact SVD of ``M``. Cost ``O((d_out + d_in)(K r)^2)`` instead of a
dense ``O(d_out d_in min(d_out, d_in))`` SVD (DESIGN.md, steps 1-3 and 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .validate import check_client_factors


class SVDAggregate(NamedTuple):
    """Best rank-``rank`` factors of the weighted sum and what they could not hold."""

    u: torch.Tensor
    """(d_out x rank), orthonormal columns."""
    s: torch.Tensor
    """(rank,), non-negative, descending."""
    v: torch.Tensor
    """(d_in x rank), orthonormal columns."""
    truncated_norm: torch.Tensor
    """Frobenius norm of ``M - u diag(s) v^T`` (the discarded singular values)."""


def orthonormal_range(stacked: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q, R`` with ``stacked = Q R``, ``Q`` orthonormal (d x m'), ``R`` (m' x m).

    ``"qr"``: Householder thin QR, accurate for any input.
    ``"gram"``: eigendecomposition of the m x m Gram matrix, one GEMM instead of a QR
    (about 3x faster on CPU) but it squares the condition number: directions whose
    singular value is below ``sqrt(eps)`` of the largest are dropped. Use it in
    float64 or when client factors are well separated.
    """
    if method == "qr":
        return torch.linalg.qr(stacked, mode="reduced")
    if method == "gram":
        gram = stacked.T @ stacked
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > evals[-1].clamp_min(0) * torch.finfo(stacked.dtype).eps * stacked.shape[1]
        root = evals[keep].sqrt()
        basis = evecs[:, keep]
        q = stacked @ (basis / root)
        return q, root[:, None] * basis.T
    raise ValueError(f"unknown method {method!r}; use 'qr' or 'gram'")


def complete_basis(q: torch.Tensor, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend orthonormal columns ``q`` (d x m) to ``width`` orthonormal columns."""
    missing = width - q.shape[1]
    if missing <= 0:
        return q[:, :width]
    fill = torch.randn(q.shape[0], missing, dtype=q.dtype, device=q.device, generator=generator)
    fill -= q @ (q.T @ fill)
    extra, _ = torch.linalg.qr(fill)
    return torch.cat([q, extra], dim=1)


def aggregate_svd(
    us: Sequence[torch.Tensor],
    ss: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    rank: int,
    method: str = "qr",
) -> SVDAggregate:
    """Best rank-``rank`` approximation of ``sum_k weights[k] * us[k] @ diag(ss[k]) @ vs[k].T``.

    Parameters
    ----------
    us, ss, vs : sequences of tensors
        Client factors ``U_k`` (d_out x r_k), ``s_k`` (r_k,), ``V_k`` (d_in x r_k).
        Ranks may differ between clients; ``s_k`` need not be sorted or positive.
    weights : sequence of float
        Non-negative client weights (not normalised here: pass shares to average).
    rank : int
        Rank of the result, at most ``min(d_out, d_in)``. If the sum has lower rank, the
        result is padded with zero singular values and orthonormal completions.
    method : {"qr", "gram"}
        How to orthonormalise the stacked factors; see :func:`orthonormal_range`.

    Returns
    -------
    SVDAggregate
        ``u``, ``s``, ``v`` and ``truncated_norm``, in the dtype of ``us[0]``.

    Raises
    ------
    ValueError
        Naming the client and tensor, for mismatched shapes, NaN/Inf values or a
        negative weight.
    """
    check_client_factors(us, ss, vs, weights)
    d_out, d_in = us[0].shape[0], vs[0].shape[0]
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must be between 1 and min(d_out, d_in) = {min(d_out, d_in)}")
    dtype, device = us[0].dtype, us[0].device
    stacked_u = torch.cat([u.to(dtype) for u in us], dim=1)
    stacked_v = torch.cat([v.to(dtype) for v in vs], dim=1)
    diag = torch.cat([float(w) * s.to(dtype) for w, s in zip(weights, ss)])
    q_u, r_u = orthonormal_range(stacked_u, method)
    q_v, r_v = orthonormal_range(stacked_v, method)
    core = (r_u * diag) @ r_v.T
    x, sigma, y_t = torch.linalg.svd(core, full_matrices=False)
    keep = min(rank, sigma.shape[0])
    u = q_u @ x[:, :keep]
    v = q_v @ y_t[:keep].T
    s = sigma[:keep]
    truncated_norm = sigma[keep:].square().sum().sqrt()
    if keep < rank:
        u = complete_basis(u, rank)
        v = complete_basis(v, rank)
        s = torch.cat([s, torch.zeros(rank - keep, dtype=dtype, device=device)])
    return SVDAggregate(u, s, v, truncated_norm)


def dense_weighted_sum(
    us: Sequence[torch.Tensor],
    ss: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> torch.Tensor:
    """The dense d_out x d_in sum; a reference for tests and benchmarks only."""
    return sum(float(w) * (u * s) @ v.T for u, s, v, w in zip(us, ss, vs, weights))
