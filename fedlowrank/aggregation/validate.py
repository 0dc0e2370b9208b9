"""Checks on client factors, so that a bad update is named and never averaged in."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_client_factors(
    us: Sequence[torch.Tensor],
    ss: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    grouped: bool = False,
) -> None:
    """Raise ``ValueError`` naming the client and tensor of the first bad input.

    Parameters
    ----------
    us, ss, vs : sequences of tensors
        Per client ``U_k`` (d_out x r_k), ``S_k`` (r_k,) or, if ``grouped``, (G x r_k),
        and ``V_k`` (d_in x r_k).
    weights : sequence or tensor
        Per client a non-negative weight (or, if ``grouped``, one per group).
    grouped : bool (default: False)
        Whether ``S_k`` has one row per group.
    """
    if not (len(us) == len(ss) == len(vs) == len(weights)):
        raise ValueError(
            f"got {len(us)} U, {len(ss)} S, {len(vs)} V factors and {len(weights)} "
            "weights; need one of each per client"
        )
    if len(us) == 0:
        raise ValueError("no client factors to aggregate")
    d_out, d_in = us[0].shape[0], vs[0].shape[0]
    groups = ss[0].shape[0] if grouped and ss[0].dim() == 2 else None
    for k, (u, s, v) in enumerate(zip(us, ss, vs)):
        if u.dim() != 2 or v.dim() != 2:
            raise ValueError(f"client {k}: U and V must be 2-D, got U {tuple(u.shape)}, V {tuple(v.shape)}")
        if u.shape[0] != d_out:
            raise ValueError(f"client {k}: U has {u.shape[0]} rows, client 0 has {d_out}")
        if v.shape[0] != d_in:
            raise ValueError(f"client {k}: V has {v.shape[0]} rows, client 0 has {d_in}")
        rank = u.shape[1]
        if v.shape[1] != rank:
            raise ValueError(f"client {k}: U has rank {rank} but V has rank {v.shape[1]}")
        want = (groups, rank) if grouped else (rank,)
        if grouped and s.dim() != 2:
            raise ValueError(f"client {k}: S must be (groups x rank), got {tuple(s.shape)}")
        if tuple(s.shape) != want:
            raise ValueError(f"client {k}: S has shape {tuple(s.shape)}, expected {want}")
        for name, t in (("U", u), ("S", s), ("V", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"client {k}: {name} contains NaN or Inf")
    for k, w in enumerate(weights):
        w = torch.as_tensor(w, dtype=torch.float64)
        want = (groups,) if grouped else ()
        if tuple(w.shape) != want:
            raise ValueError(f"client {k}: weight has shape {tuple(w.shape)}, expected {want}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"client {k}: weight {w.tolist()} must be finite and non-negative")
