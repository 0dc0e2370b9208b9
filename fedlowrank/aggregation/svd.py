"""Exact weighted sum of SVD-factored client adapters, re-factored without dense d_out x d_in.

For clients ``k`` with ``(U_k, s_k, V_k)`` and weights ``w_k`` the target is
``M = sum_k w_k U_k diag(s_k) V_k^T``. Stack ``A = [U_1 .. U_K]`` and ``B = [V_1 .. V_K]``
(width ``K r``), factor ``A = Q_a R_a`` and ``B = Q_b R_b``; then
``M = Q_a (R_a D R_b^T) Q_b^T`` with ``D = blockdiag(w_k diag(s_k))``, and the SVD of the
small core gives the exact SVD of ``M``. Cost ``O((d_out + d_in)(K r)^2)`` instead of a
dense ``O(d_out d_in min(d_out, d_in))`` SVD (docs/design.md, steps 1-3 and 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .accumulate import WeightedSum, top_rank
from .linalg import complete_basis, orthonormal_range, small_lapack  # noqa: F401  (re-exported)
from .ranks import Factors
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
