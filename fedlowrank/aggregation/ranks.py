"""What a client of lower rank holds of the global adapter, and what it cannot hold.

A client of rank ``r`` below the global rank ``R`` cannot load the global adapter as it
is. It loads the *head*: the best rank-``r`` approximation (G = 1: the top ``r``
singular triplets of ``U diag(S) V^T``, computed in factored form) or, for rules whose
columns are fixed (FFA-LoRA's frozen ``V``) or grouped adapters, the first / largest
``r`` columns. The *tail* is everything else: ``head + tail`` is the global adapter
exactly.

Why this matters: counting the tail of a low-rank client as zero in the weighted sum
shrinks the global adapter every round, even when nobody trains (measured: clients of
rank 2, 4 and 8 echoing a rank-8 global moved it 57% in one round, 93% in ten; raFLoRA,
2026, calls it rank collapse). The server therefore completes each reply with the tail
the client could not hold, at the client's weight, so that the sum is

    ``sum_k w_k (P_k + T_k) = G + sum_k w_k (P_k - H_k)``     (sum_k w_k = 1)

where ``P_k`` is what client ``k`` sent, ``H_k`` its head and ``T_k = G - H_k``: each
client contributes its own change, and a round in which nobody changes anything leaves
``G`` unchanged at any mix of ranks. Both sides call :func:`split_at_rank` on the same
arrays, so the head the client loads and the tail the server adds are complementary.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..wire import FACTOR_SUFFIXES
from .balance import balance_factors

TRUNCATIONS = ("svd", "columns")


class Factors(NamedTuple):
    """``dW_g = u diag(s[g]) v^T`` for every group row ``g`` of ``s``."""

    u: torch.Tensor
    """(d_out x r)"""
    s: torch.Tensor
    """(G x r)"""
    v: torch.Tensor
    """(d_in x r)"""

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def columns(self, index: torch.Tensor | slice) -> "Factors":
        """The factors restricted to some columns."""
        return Factors(self.u[:, index], self.s[:, index], self.v[:, index])


def column_magnitudes(factors: Factors, shares: torch.Tensor | None = None) -> torch.Tensor:
    """Per column ``||u_j|| ||v_j|| sqrt(sum_g pi_g s_gj^2)``: its share-weighted size."""
    u, s, v = factors
    groups = s.shape[0]
    pi = torch.full((groups,), 1.0 / groups, dtype=s.dtype) if shares is None else shares.to(s.dtype)
    return u.norm(dim=0) * v.norm(dim=0) * (pi[:, None] * s.square()).sum(dim=0).sqrt()


def sorted_triplets(factors: Factors) -> Factors:
    """G = 1: the SVD ``u diag(s) v^T`` of ``U diag(S) V^T`` (orthonormal, ``s`` descending).

    Computed from thin QRs of ``U`` and ``V`` and the SVD of the ``r x r`` core, in float64.
    """
    u, s, v = (t.double() for t in factors)
    q_u, r_u = torch.linalg.qr(u)
    q_v, r_v = torch.linalg.qr(v)
    x, sigma, y_t = torch.linalg.svd((r_u * s[0]) @ r_v.T)
    return Factors(q_u @ x, sigma[None, :], q_v @ y_t.T)


def split_at_rank(
    factors: Factors, rank: int, truncation: str = "svd", shares: torch.Tensor | None = None
) -> tuple[Factors, Factors]:
    """``(head, tail)`` with ``head`` of rank ``rank`` and ``head + tail == factors``.

    Parameters
    ----------
    factors : Factors
        The global adapter of one layer, rank ``R``.
    rank : int
        The client's rank ``r``; ``r >= R`` gives ``(factors, empty)``.
    truncation : {"svd", "columns"}
        ``"svd"``: for G = 1 the head is the best rank-``r`` approximation (sorted singular
        triplets, orthonormal ``u, v``); for G > 1 (no shared SVD exists) the ``r``
        columns of largest :func:`column_magnitudes`. ``"columns"``: the first ``r``
        columns as they are (for rules that freeze a factor).
    shares : tensor, optional
        Group shares ordering grouped columns (default uniform).

    Returns
    -------
    head, tail : Factors
        float64. ``tail`` has ``R - r`` columns (G = 1 "svd": the remaining triplets).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; use one of {TRUNCATIONS}")
    factors = Factors(*(t.double() for t in factors))
    width = factors.rank
    if rank >= width:
        empty = Factors(factors.u[:, :0], factors.s[:, :0], factors.v[:, :0])
        return factors, empty
    if truncation == "columns":
        return factors.columns(slice(0, rank)), factors.columns(slice(rank, width))
    if factors.s.shape[0] == 1:
        ordered = sorted_triplets(factors)
    else:
        order = torch.argsort(column_magnitudes(factors, shares), descending=True, stable=True)
        ordered = factors.columns(order)
    return ordered.columns(slice(0, rank)), ordered.columns(slice(rank, width))


def fit_rank(
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    rank: int,
    truncation: str = "svd",
    shares: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors in the wire convention fitted to ``rank`` columns.

    Below the received rank: the head of :func:`fedlowrank.aggregation.ranks.split_at_rank`
    (G = 1 ``"svd"``: the best rank-``rank`` approximation, handed over balanced as
    ``u sqrt(s)``, ``S = 1``, ``v sqrt(s)``), the complement of the tail the server adds
    for this client. Above it: padded with fresh adapter columns (``U = 0``, ``S = 1``,
    ``V`` kept from the model) by the caller.
    """
    if u.shape[1] <= rank:
        return u, s, v
    head, _ = split_at_rank(Factors(u, s, v), rank, truncation, shares)
    if truncation == "svd" and head.s.shape[0] == 1:
        head = Factors(*balance_factors(head.u, head.s[0], head.v))
    return head.u.to(u.dtype), head.s.to(s.dtype), head.v.to(v.dtype)


def factor_ranks(arrays) -> dict[str, int]:
    """``module -> rank`` of the adapter factors in a mapping of exchanged arrays."""
    return {key[: -len(".lora_U")]: int(np.shape(value)[1]) for key, value in arrays.items() if key.endswith(".lora_U")}


def fit_arrays_to_ranks(arrays, ranks, truncation: str = "svd", shares=None) -> dict[str, np.ndarray]:
    """Exchanged arrays with each module in ``ranks`` fitted to that rank by :func:`fit_rank`.

    What a client of lower rank holds of the global arrays: both sides of a compressed
    update call this on the same global arrays (the client to form ``local - head``, the
    server to add the decoded delta back), so the head is the same on both. Float64.
    """
    out = {key: np.asarray(value, dtype=np.float64) for key, value in arrays.items()}
    share_tensor = None if shares is None else torch.as_tensor(shares, dtype=torch.float64)
    for module, rank in ranks.items():
        u, s, v = (torch.from_numpy(out[f"{module}.{leaf}"]) for leaf in FACTOR_SUFFIXES)
        if rank > u.shape[1]:
            raise ValueError(f"{module}: rank {rank} is above the global rank {u.shape[1]}")
        fitted = fit_rank(u, s, v, rank, truncation, share_tensor)
        for leaf, value in zip(FACTOR_SUFFIXES, fitted):
            out[f"{module}.{leaf}"] = value.numpy()
    return out
