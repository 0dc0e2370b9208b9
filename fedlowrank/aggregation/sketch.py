"""Exact low-rank aggregation from two sums: the randomised range finder on the clients' products.

The server wants ``M = sum_k w_k U_k diag(s_k) V_k^T`` (per group row of ``s`` for grouped
adapters) but, under secure aggregation, learns only sums of what clients send. The range
finder (Halko, Martinsson and Tropp 2011; FedASK, NeurIPS 2025) is linear in the products:

1. every client sends ``Y_k = w_k P_k Omega`` for a random ``Omega`` (``d_in x width``) drawn
   from a seed all parties know; the server learns ``Y = M Omega`` and an orthonormal
   basis ``Q`` of its range;
2. every client sends ``Z_k = w_k P_k^T Q``; the server learns ``Z = M^T Q`` and forms
   ``Q Z^T = Q Q^T M``.

``Q Q^T M = M`` whenever ``width`` is at least the rank of ``M`` (at most the sum of the
clients' ranks): the server sizes it from the ranks it assigned. A few extra columns of
``Omega`` (``probes``) give an a posteriori estimate of ``||M - Q Q^T M|| / ||M||``
(``||(I - Q Q^T) M w|| / ||M w||`` over Gaussian ``w``), reported when ``width`` is smaller.
A client computes both sketches from its factors in ``O((d_out + d_in) r width)``, never
forming ``P_k``.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch

from .ranks import Factors

PROBES = 8
"""Extra Gaussian columns of ``Omega`` that estimate the error of a narrow sketch."""


def sketch_matrix(seed: int, module: str, d_in: int, width: int, probes: int = PROBES) -> np.ndarray:
    """``Omega`` (``d_in x (width + probes)``, float64, entries N(0, 1/d_in)), the same on every party.

    Drawn from the round's ``seed`` and the layer's name, so the server sends one integer.
    """
    digest = hashlib.sha256(f"{int(seed)}:{module}".encode()).digest()
    gen = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    return gen.standard_normal((d_in, width + probes)) / np.sqrt(d_in)


def range_sketch(u: np.ndarray, s: np.ndarray, v: np.ndarray, omega: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``w_g P_g Omega`` per group row ``g`` of ``s`` (``G x d_out x columns``), from the factors."""
    u, s, v = (np.asarray(t, dtype=np.float64) for t in (u, s, v))
    inner = v.T @ omega  # r x columns
    return np.stack([w * (u @ (row[:, None] * inner)) for w, row in zip(np.asarray(weights, dtype=np.float64), np.atleast_2d(s))])


def corange_sketch(u: np.ndarray, s: np.ndarray, v: np.ndarray, basis: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``w_g P_g^T Q_g`` per group (``G x d_in x width``), from the factors."""
    u, s, v = (np.asarray(t, dtype=np.float64) for t in (u, s, v))
    return np.stack([w * (v @ (row[:, None] * (u.T @ q))) for w, row, q in zip(np.asarray(weights, dtype=np.float64), np.atleast_2d(s), basis)])


def range_basis(y: np.ndarray, width: int, relative_tolerance: float = 1e-9) -> np.ndarray:
    """An orthonormal basis of each group's ``Y[:, :, :width]`` (``G x d_out x width``).

    Directions below ``relative_tolerance`` times the largest singular value (a sum of
    lower rank than ``width``, or quantisation noise) become zero columns: they add nothing
    to ``Q Z^T``, and a zero column costs less than a width that changes per group.
    """
    out = np.zeros((y.shape[0], y.shape[1], width))
    for g, block in enumerate(y[:, :, :width]):
        left, sigma, _ = np.linalg.svd(block, full_matrices=False)
        keep = sigma > relative_tolerance * sigma[0] if sigma.size and sigma[0] > 0 else np.zeros(sigma.shape, bool)
        out[g, :, : int(keep.sum())] = left[:, keep]
    return out


class Recovered(NamedTuple):
    """The sum recovered from the two sketches."""

    factors: Factors
    """``M`` (or ``Q Q^T M``) factored: ``u diag(s[g]) v^T`` per group, float64."""
    error: float
    """Estimated ``||M - Q Q^T M||_F / ||M||_F`` over all groups, from the probe columns (0 if exact)."""


def recover(basis: np.ndarray, z: np.ndarray, y: np.ndarray) -> Recovered:
    """``Q Z^T`` as factors, and the estimated error of the narrow range (from ``y``'s probe columns).

    ``basis`` ``(G x d_out x width)``, ``z = M^T Q`` ``(G x d_in x width)``, ``y = M Omega`` with
    the probe columns after the first ``width``. Groups get their own columns (block
    stacked), each group's ``s`` row zero on the other groups' columns.
    """
    groups, _, width = basis.shape
    us, vs, ss = [], [], []
    for g in range(groups):
        right, sigma, left_t = np.linalg.svd(z[g], full_matrices=False)  # Z = A S B^T, so Q Z^T = (Q B) S A^T
        keep = sigma > 0
        us.append(basis[g] @ left_t.T[:, keep])
        vs.append(right[:, keep])
        ss.append(sigma[keep])
    s = np.zeros((groups, sum(len(x) for x in ss)))
    start = 0
    for g, sigma in enumerate(ss):
        s[g, start:start + len(sigma)] = sigma
        start += len(sigma)
    factors = Factors(*(torch.from_numpy(np.ascontiguousarray(t)) for t in (np.concatenate(us, 1), s, np.concatenate(vs, 1))))
    probes = y[:, :, width:]
    missed = sum(float(np.sum((p - q @ (q.T @ p)) ** 2)) for p, q in zip(probes, basis))
    total = float(np.sum(probes**2))
    return Recovered(factors, float(np.sqrt(missed / total)) if total > 0 else 0.0)
