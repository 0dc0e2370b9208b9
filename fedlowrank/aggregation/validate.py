"""Checks on what clients send (factors, arrays, weights), so that a bad update is named and never averaged in."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..wire import split_factor_key


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


MAX_ABS_VALUE = 1e6
"""Largest entry a reply's arrays, and its adapters' products, may hold (the products by the
row-norm bound). A client refuses a global above it (``build_client_app(max_abs_global=...)``),
so a reply above it would end the federation: it is refused instead, whatever ``robust`` says,
and the weighted mean of accepted replies stays within it."""

MAX_WEIGHT = 1e9
"""Default cap on a reply's weight (sample count) and per-group counts: larger values are
refused (``1e30`` examples would make the global that client's model)."""


def finite_number(value, what: str) -> float:
    """``value`` as a float; ``ValueError`` unless it is one finite number (not a list, not bool)."""
    if isinstance(value, (list, bool)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} = {value!r} must be a number")
    try:
        value = float(value)
    except OverflowError:  # a Python int past float's range (10**400)
        raise ValueError(f"{what} = {value!r} must be finite") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} = {value!r} must be finite")
    return value


def check_weight(value, what: str = "weight", max_weight: float = MAX_WEIGHT) -> float:
    """A reply's aggregation weight as a float; ``ValueError`` if not finite, negative or above the cap."""
    try:
        weight = finite_number(value, what)
    except ValueError:
        raise ValueError(f"{what} = {value!r} must be a finite number >= 0") from None
    if weight < 0:
        raise ValueError(f"{what} = {value!r} must be a finite number >= 0")
    if weight > max_weight:
        raise ValueError(f"{what} = {weight:g} is above the cap {max_weight:g}")
    return weight


def declared_weights(mapping: Mapping[Any, Any] | None) -> dict[str, float] | None:
    """An operator's ``{node id: largest weight}`` checked and keyed by ``str(node id)``; None stays None."""
    if mapping is None:
        return None
    declared = {}
    for node, limit in dict(mapping).items():
        try:
            value = finite_number(limit, f"declared weight of node {node}")
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"declared weight of node {node} = {limit!r} must be a finite number > 0")
        declared[str(node).strip()] = value
    if not declared:
        raise ValueError("node_max_weights is empty: declare at least one node, or pass None")
    return declared


def check_declared_weight(node: Any, weight: float, declared: Mapping[str, float] | None) -> None:
    """``ValueError`` unless ``node`` is a declared site claiming at most its declared weight.

    Keyed on the node id Flower authenticated (``src_node_id``), not on anything the reply
    says about itself: a site cannot buy itself more than the operator declared for it.
    """
    if declared is None:
        return
    limit = declared.get(str(node))
    if limit is None:
        raise ValueError(f"node {node} is not a declared site (node_max_weights declares {len(declared)} nodes)")
    if weight > limit:
        raise ValueError(f"weight = {weight:g} is above node {node}'s declared maximum {limit:g}")


def check_reply_arrays(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
    """Raise ``ValueError`` unless a reply's arrays fit the arrays the server sent.

    The keys must be the same; factors (``*.lora_U/S/V``) may change rank but keep the
    layer's row counts, and a layer's three factors agree on it; every other array keeps
    its shape. Every array is float (integers and bools are refused by name), finite and at most
    :data:`MAX_ABS_VALUE` in absolute value.
    """
    if set(arrays) != set(sent):
        missing = sorted(set(sent) - set(arrays))
        extra = sorted(set(arrays) - set(sent))
        raise ValueError(f"array keys differ from the global model: missing {missing}, unexpected {extra[:10]}")
    for key, want in sent.items():
        got = np.asarray(arrays[key])
        factor = split_factor_key(key)
        if factor is None:
            if tuple(got.shape) != tuple(np.shape(want)):
                raise ValueError(f"tensor '{key}' has shape {got.shape}, expected {tuple(np.shape(want))}")
        elif got.ndim != 2 or got.shape[0] != np.shape(want)[0]:
            raise ValueError(f"factor '{key}' has shape {got.shape}, expected ({np.shape(want)[0]}, rank)")
        if got.dtype.kind != "f":
            raise ValueError(f"tensor '{key}' has dtype {got.dtype}; only float arrays are aggregated (a mean of integers or bools is not one)")
        peak = float(np.max(np.abs(got))) if got.size else 0.0  # one pass: NaN and Inf propagate to the peak
        if not np.isfinite(peak):
            raise ValueError(f"tensor '{key}' contains NaN or Inf")
        if peak > MAX_ABS_VALUE:
            raise ValueError(f"tensor '{key}' has an entry of {peak:.3g}, above the {MAX_ABS_VALUE:g} a client accepts in a global")
    for module in {f[0] for f in map(split_factor_key, arrays) if f is not None}:
        ranks = {leaf: np.shape(arrays[f"{module}.{leaf}"])[1] for leaf in ("lora_U", "lora_S", "lora_V")}
        if len(set(ranks.values())) != 1:
            raise ValueError(f"factors of '{module}' disagree on rank: {ranks}")
        # Entries of U diag(S[g]) V^T are at most (row norm of U diag(|S[g]|)) x (row norm of V)
        # (Cauchy-Schwarz): bounded in O((d_out + d_in) r), without forming the product.
        # In the arrays' own dtype: entries are at most 1e6 here, so squares and sums stay finite in float32.
        u, s, v = (np.asarray(arrays[f"{module}.{leaf}"]) for leaf in ("lora_U", "lora_S", "lora_V"))
        if u.size and v.size:
            rows = max(float(np.einsum("ij,ij->i", us := u * np.abs(row), us).max()) for row in s)
            bound = (rows * float(np.einsum("ij,ij->i", v, v).max())) ** 0.5
            if bound > MAX_ABS_VALUE:
                raise ValueError(f"adapter '{module}': its product can reach {bound:.3g}, above the {MAX_ABS_VALUE:g} "
                                 "a client accepts in a global")
