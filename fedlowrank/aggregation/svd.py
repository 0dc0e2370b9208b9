"""Exact weighted sum of SVD-factored client adapters, re-factored without dense d_out x d_in.

For clients ``k`` with ``(U_k, s_k, V_k)`` and weights ``w_k`` the target is
``M = sum_k w_k U_k diag(s_k) V_k^T``. Stack ``A = [U_1 .. U_K]`` and ``B = [V_1 .. V_K]``
(width ``K r``), factor ``A = Q_a R_a`` and ``B = Q_b R_b``; then
``M = Q_a (R_a D R_b^T) Q_b^T`` with ``D = blockdiag(w_k diag(s_k))``, and the SVD of the
small core gives the exact SVD of ``M``. Cost ``O((d_out + d_in)(K r)^2)`` instead of a
dense ``O(d_out d_in min(d_out, d_in))`` SVD (docs/design.md, steps 1-3 and 5).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


@contextmanager
def small_lapack() -> Iterator[None]:
    """Run small (K r x K r) factorisations on one thread.

    On a loaded machine (a simulation's clients share the cores with the server) MKL's
    threaded eigh/SVD of a 512 x 512 matrix took 4-7 s instead of 0.03 s on one thread:
    the threads wait on each other. These matrices are too small to gain from threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def orthonormal_range(stacked: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q, R`` with ``stacked = Q R``, ``Q`` orthonormal (d x m'), ``R`` (m' x m).

    ``"qr"``: Householder thin QR, accurate for any input.
    ``"gram"``: Cholesky QR in float64: one GEMM for the m x m Gram matrix and a
    Cholesky factor, several times faster than a QR on CPU. It squares the condition
    number, which float64 absorbs up to about 1e7; when the Gram matrix is not
    numerically positive definite (clients that agree to rounding error), it falls back
    to an eigendecomposition that drops directions below ``sqrt(eps)`` of the largest.
    ``Q`` is returned in the input dtype, ``R`` in float64.
    """
    if method == "qr":
        return torch.linalg.qr(stacked, mode="reduced")
    if method != "gram":
        raise ValueError(f"unknown method {method!r}; use 'qr' or 'gram'")
    wide = stacked.double()
    gram = wide.T @ wide
    with small_lapack():
        lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool(torch.isfinite(lower).all()):
        # Condition of R is the square root of the Gram's: trust it while that stays small.
        diag = lower.diagonal()
        if float(diag.min()) > float(diag.max()) * 1e-7:
            r = lower.T
            q = torch.linalg.solve_triangular(lower, wide.T, upper=False).T
            return q.to(stacked.dtype), r
    with small_lapack():
        evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals[-1].clamp_min(0) * torch.finfo(torch.float64).eps * stacked.shape[1]
    root = evals[keep].sqrt()
    basis = evecs[:, keep]
    q = wide @ (basis / root)
    return q.to(stacked.dtype), root[:, None] * basis.T


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
    method: str = "gram",
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
    method : {"gram", "qr"} (default: "gram")
        How to orthonormalise the stacked factors and split the core; see
        :func:`orthonormal_range` and :func:`core_svd`. Both are exact to rounding;
        "gram" is several times faster on CPU, "qr" never squares a condition number.

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
    from .accumulate import WeightedSum, top_rank  # accumulate builds on this module
    from .ranks import Factors

    check_client_factors(us, ss, vs, weights)
    d_out, d_in = us[0].shape[0], vs[0].shape[0]
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must be between 1 and min(d_out, d_in) = {min(d_out, d_in)}")
    dtype = us[0].dtype
    # Kept factored whatever the width: this entry point is the factored algorithm.
    acc = WeightedSum(d_out, d_in, dtype=dtype, dense_above=sum(u.shape[1] for u in us) + 1)
    for u, s, v, w in zip(us, ss, vs, weights):
        acc.add_normalised(Factors(u.to(dtype), (float(w) * s.to(dtype))[None, :], v.to(dtype)))
    top = top_rank(acc, rank, method)
    return SVDAggregate(top.factors.u, top.factors.s[0], top.factors.v, top.truncated_norm.to(dtype))


def dense_weighted_sum(
    us: Sequence[torch.Tensor],
    ss: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> torch.Tensor:
    """The dense d_out x d_in sum; a reference for tests and benchmarks only."""
    return sum(float(w) * (u * s) @ v.T for u, s, v, w in zip(us, ss, vs, weights))
