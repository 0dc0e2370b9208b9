"""Per-group exact aggregation: shared ``U, V`` and one row of ``S`` per group (FairLoRA).

Clients ``k`` send ``(U_k, S_k, V_k)`` with ``S_k`` of shape (G x r_k) and one weight per
group, ``w_kg``. The target for group ``g`` is ``M_g = sum_k w_kg U_k diag(S_k[g]) V_k^T``;
it is re-factored as ``u diag(s[g]) v^T`` with ``u, v`` orthonormal and shared by all
groups (docs/design.md, "Exact factored aggregation", step 4).

Method
------
1. The stacked QR reduction of :func:`~fedlowrank.aggregation.svd.aggregate_svd`:
   ``[U_1 .. U_K] = Q_u R_u``, ``[V_1 .. V_K] = Q_v R_v``, and small cores
   ``C_g = R_u blockdiag_k(w_kg diag(S_k[g])) R_v^T``, so ``M_g = Q_u C_g Q_v^T`` exactly.
   Everything after this works on the (K r x K r) cores; d_out x d_in is never formed.
2. Shared factors with a diagonal per group is a CP (PARAFAC) decomposition of the
   stack ``[C_1 .. C_G]``. We fit it with orthonormal ``X, Y`` by alternating
   least squares, started from the pooled SVD of ``sum_g pi_g C_g``:

   - ``X`` step: with ``Y`` and ``s`` fixed, ``sum_g ||C_g - X diag(s_g) Y^T||^2`` over
     orthonormal ``X`` is an orthogonal Procrustes problem, solved exactly by the polar
     factor of ``sum_g C_g Y diag(s_g)``;
   - ``s`` step: with ``X, Y`` orthonormal the best diagonal is ``s_g = diag(X^T C_g Y)``;
   - ``Y`` step: as ``X``, transposed; then ``s`` again.

   Each step solves its sub-problem exactly, so the error never increases and the
   result is never worse than the one-shot pooled basis (the starting point).
   The alternative ``update="lstsq"`` (plain CP-ALS least-squares step for ``X``, then
   re-orthonormalise by QR, then refit ``s``) is not monotone and stalls higher
   (measured below), so Procrustes is the default.
3. ``u = Q_u X``, ``v = Q_v Y``. Because ``Q_u, Q_v`` are orthonormal, each group's
   residual norm ``||M_g - u diag(s_g) v^T||`` equals ``||C_g - X diag(s_g) Y^T||``,
   which is computed directly on the small core (no cancellation from subtracting
   squared norms).

Measured (float64, 64 x 48, K = 8 clients of rank 4, G = 2, 10 seeds; mean per-group
relative error ``||M_g - approx|| / ||M_g||``; the rank-4 per-group floor is the best
separate truncation of each ``M_g``). "structured": each group owns 4 true directions,
each client trains a noisy subset of all 8; "gaussian": independent random factors.

=========== ===== ===== ============ ============ ===========
case        R     floor pooled       ALS          lstsq-ALS
=========== ===== ===== ============ ============ ===========
structured  4     0.20  0.63         0.51         0.52
structured  8     0.20  0.45         0.20         0.21
structured  16    0.20  0.43         0.14         0.16
gaussian    4     0.54  0.77         0.68         0.70
gaussian    8     0.54  0.70         0.51         0.54
gaussian    16    0.54  0.65         0.35         0.41
=========== ===== ===== ============ ============ ===========

At ``R = G r`` every group was within 7% of its floor (worst group, worst seed). At
``R = r`` the fit is poor and unfair: the summed objective may give all columns to one
group (per-group errors 0.19 and 0.99 in one structured seed), so report the per-group
norms and prefer ``R = G r``. ALS converges to 3 decimals within ~100 sweeps; the
default 200 sweeps cost ~50 ms here (one (K r x R) SVD per half-sweep).

Weights
-------
``weights[k][g]`` is client ``k``'s weight in group ``g``'s sum. The caller normalises
per group, usually ``w_kg = n_kg / sum_j n_jg`` from per-group sample counts ``n_kg``, so
that each ``M_g`` is that group's average update; :func:`group_weights_from_counts` does
this. Nothing is normalised here, as in :func:`aggregate_svd`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .balance import DEAD_COLUMN_NORM
from .linalg import complete_basis, orthonormal_range
from .validate import check_client_factors


class GroupedSVDAggregate(NamedTuple):
    """Shared orthonormal factors, per-group singular values and what they could not hold."""

    u: torch.Tensor
    """(d_out x R), unit-norm columns: orthonormal from the pooled start, not always from
    the block start (``start="best"`` keeps whichever fits better)."""
    s: torch.Tensor
    """(G x R); ``dW_g = u diag(s[g]) v^T``. Entries may be negative (a group may pull
    against the shared direction). Columns sorted by pooled magnitude, descending."""
    v: torch.Tensor
    """(d_in x R), unit-norm columns, as ``u``."""
    residual_norms: torch.Tensor
    """(G,) Frobenius norm of ``M_g - u diag(s[g]) v^T``: what the global rank could not hold."""
    floor_norms: torch.Tensor
    """(G,) the same for the best separate rank-``rank`` truncation of each ``M_g``."""
    pooled_norms: torch.Tensor
    """(G,) the same for the one-shot pooled basis (top-R SVD of ``sum_g pi_g M_g``, best
    diagonal per group): the starting point of the ALS, reported for comparison."""
    target_norms: torch.Tensor
    """(G,) ``||M_g||``, to turn the norms above into relative errors."""
    iterations: int
    """ALS sweeps run (0 for G = 1, where the SVD is already optimal)."""


def group_weights_from_counts(counts: torch.Tensor | Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group client weights and group shares from per-group sample counts.

    Parameters
    ----------
    counts : (K x G) array-like
        ``counts[k][g]``: samples of group ``g`` that client ``k`` trained on.

    Returns
    -------
    weights : torch.Tensor
        (K x G) float64, ``counts[k][g] / sum_j counts[j][g]``; a group nobody saw gets
        all-zero weights (its ``M_g`` is zero).
    shares : torch.Tensor
        (G,) float64, each group's share of all samples.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 2:
        raise ValueError(f"counts must be (clients x groups), got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("counts must be finite and non-negative")
    per_group = counts.sum(dim=0)
    total = per_group.sum()
    if total <= 0:
        raise ValueError("counts sum to zero: no samples to weight by")
    weights = counts / per_group.clamp_min(1e-300)
    return weights, per_group / total


def _check_shares(group_shares, groups: int, dtype, device) -> torch.Tensor:
    """Group shares as a tensor summing to 1 (uniform if None)."""
    if group_shares is None:
        return torch.full((groups,), 1.0 / groups, dtype=dtype, device=device)
    shares = torch.as_tensor(group_shares, dtype=dtype, device=device)
    if tuple(shares.shape) != (groups,):
        raise ValueError(f"group_shares has shape {tuple(shares.shape)}, expected ({groups},)")
    if not bool(torch.isfinite(shares).all()) or bool((shares < 0).any()) or shares.sum() <= 0:
        raise ValueError(f"group_shares {shares.tolist()} must be finite, non-negative, not all zero")
    return shares / shares.sum()


def _small_cores(us, ss, vs, weights, method):
    """``Q_u, Q_v`` and the stacked cores ``C`` (G x m_u x m_v) with ``M_g = Q_u C_g Q_v^T``."""
    dtype = us[0].dtype
    q_u, r_u = orthonormal_range(torch.cat([u.to(dtype) for u in us], dim=1), method)
    q_v, r_v = orthonormal_range(torch.cat([v.to(dtype) for v in vs], dim=1), method)
    # diag[g] = concat_k w_kg * S_k[g]: the block diagonal of each group's core.
    diag = torch.cat(
        [torch.as_tensor(w, dtype=dtype, device=s.device)[:, None] * s.to(dtype) for w, s in zip(weights, ss)],
        dim=1,
    )
    cores = torch.einsum("am,gm,bm->gab", r_u, diag, r_v)
    return q_u, q_v, cores


def _fit_diagonals(x: torch.Tensor, y: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """Best ``s_g`` for orthonormal ``x, y``: ``diag(x^T C_g y)``, (G x R)."""
    # Batched matmuls: einsum over three operands is ~15x slower on these small sizes.
    return ((cores @ y) * x).sum(dim=1)


def _residual_norms(x, s, y, cores) -> torch.Tensor:
    """``||C_g - x diag(s_g) y^T||`` per group, directly on the small cores."""
    approx = torch.einsum("ar,gr,br->gab", x, s, y)
    return (cores - approx).flatten(1).norm(dim=1)


def _polar(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor of ``a`` closest to it (maximises ``tr(X^T a)``)."""
    left, _, right_t = torch.linalg.svd(a, full_matrices=False)
    return left @ right_t


def _orthonormal_update(a: torch.Tensor, update: str) -> torch.Tensor:
    """New orthonormal factor from ``a = sum_g C_g Y diag(s_g)`` (or its transpose form)."""
    if update == "procrustes":
        return _polar(a)
    # Plain CP-ALS: X = a (sum_g diag(s_g)^2)^{-1} (Y orthonormal), then re-orthonormalise.
    # A positive column scaling leaves Gram-Schmidt's Q (diag(R) > 0) unchanged, so QR of
    # ``a`` itself gives the same X.
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)


def _als(cores, x, y, iterations: int, tol: float, update: str):
    """Alternate ``X``, ``s``, ``Y``, ``s`` updates; returns ``x, s, y, sweeps``.

    Stops when a sweep raises the captured energy ``sum_g ||s_g||^2`` (with orthonormal
    ``x, y`` this is ``sum_g ||C_g||^2`` minus the squared error) by at most
    ``tol * sum_g ||C_g||^2``.
    """
    total = cores.square().sum()
    s = _fit_diagonals(x, y, cores)
    captured = s.square().sum()
    best = (x, s, y, captured)
    sweeps = 0
    for sweeps in range(1, iterations + 1):
        x = _orthonormal_update(((cores @ y) * s[:, None, :]).sum(dim=0), update)
        s = _fit_diagonals(x, y, cores)
        y = _orthonormal_update(((cores.transpose(1, 2) @ x) * s[:, None, :]).sum(dim=0), update)
        s = _fit_diagonals(x, y, cores)
        gained = s.square().sum() - captured
        captured = s.square().sum()
        if captured > best[3]:
            best = (x, s, y, captured)
        # abs(): the lstsq update may lose energy; a loss is not progress either.
        if abs(gained) <= tol * total:
            break
    # Keep the best iterate: equal to the last for Procrustes (monotone), and it makes
    # the "never worse than the start" guarantee hold for the lstsq variant too.
    return best[0], best[1], best[2], sweeps


def _canonical_order(x, s, y, shares):
    """Sort columns by pooled magnitude and make each column's pooled ``s`` non-negative."""
    pooled = shares @ s
    flip = torch.where(pooled < 0, -1.0, 1.0).to(s.dtype)
    x, s = x * flip, s * flip
    order = torch.argsort(shares @ s.square(), descending=True, stable=True)
    return x[:, order], s[:, order], y[:, order]


def aggregate_grouped_svd(
    us: Sequence[torch.Tensor],
    ss: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: Sequence[Sequence[float]] | torch.Tensor,
    rank: int,
    global_rank: int | None = None,
    group_shares: Sequence[float] | torch.Tensor | None = None,
    iterations: int = 200,
    tol: float = 1e-9,
    update: str = "procrustes",
    method: str = "qr",
    start: str = "best",
) -> GroupedSVDAggregate:
    """Shared ``u, v`` and per-group ``s`` approximating each ``M_g = sum_k w_kg U_k diag(S_k[g]) V_k^T``.

    Parameters
    ----------
    us, ss, vs : sequences of tensors
        Client factors ``U_k`` (d_out x r_k), ``S_k`` (G x r_k), ``V_k`` (d_in x r_k).
        Ranks may differ between clients.
    weights : (K x G) array-like
        ``weights[k][g]``, non-negative: client ``k``'s weight in group ``g``'s sum. Not
        normalised here; for per-group averages pass ``n_kg / sum_j n_jg`` (see
        :func:`group_weights_from_counts`).
    rank : int
        The per-group rank ``r`` of the reported floor (and the default global rank).
    global_rank : int, optional
        Number of shared columns ``R`` (default ``rank``), at most ``min(d_out, d_in)``.
        With shared factors a global rank of ``G * rank`` is usually needed to reach the
        per-group floor; it is an option, and the error is reported next to the floor.
    group_shares : (G,) array-like, optional
        Each group's share of all samples (default uniform). Used for the pooled
        starting point ``sum_g pi_g C_g`` and to order and sign the columns; the fitted
        objective ``sum_g ||M_g - u diag(s_g) v^T||^2`` treats groups equally.
    iterations : int
        Maximum ALS sweeps.
    tol : float
        Stop when a sweep reduces the total squared error by at most ``tol`` times
        ``sum_g ||M_g||^2``.
    update : {"procrustes", "lstsq"}
        How ``X, Y`` are updated (see the module docstring); ``"lstsq"`` is kept for
        comparison only.
    method : {"qr", "gram"}
        How to orthonormalise the stacked factors; see :func:`orthonormal_range`.
    start : {"best", "pooled"}
        ``"pooled"``: ALS from the pooled SVD only. ``"best"`` (default): also from the
        block start, keeping the better fit (see :func:`fit_grouped`).

    Returns
    -------
    GroupedSVDAggregate
        In the dtype of ``us[0]``. For G = 1 this is :func:`aggregate_svd`'s result
        (``s`` as a 1 x R row, ``residual_norms[0]`` its ``truncated_norm``).

    Raises
    ------
    ValueError
        Naming the client, for mismatched shapes (including an ``S`` whose row count or a
        weight whose length differs from the group count), NaN/Inf or negative weights,
        and for bad ranks, shares or options.
    """
    if len(ss) > 0 and torch.as_tensor(ss[0]).dim() != 2:
        raise ValueError(f"client 0: S must be (groups x rank), got {tuple(ss[0].shape)}")
    check_client_factors(us, ss, vs, weights, grouped=True)
    if update not in ("procrustes", "lstsq"):
        raise ValueError(f"unknown update {update!r}; use 'procrustes' or 'lstsq'")
    d_out, d_in = us[0].shape[0], vs[0].shape[0]
    limit = min(d_out, d_in)
    global_rank = rank if global_rank is None else global_rank
    for name, value in (("rank", rank), ("global_rank", global_rank)):
        if not 1 <= value <= limit:
            raise ValueError(f"{name} {value} must be between 1 and min(d_out, d_in) = {limit}")
    groups = ss[0].shape[0]
    dtype, device = us[0].dtype, us[0].device
    shares = _check_shares(group_shares, groups, dtype, device)

    q_u, q_v, cores = _small_cores(us, ss, vs, weights, method)
    return fit_grouped(q_u, q_v, cores, rank, global_rank, shares, iterations, tol, update, start)


def fit_grouped(
    q_u: torch.Tensor | None,
    q_v: torch.Tensor | None,
    cores: torch.Tensor,
    rank: int,
    global_rank: int,
    shares: torch.Tensor,
    iterations: int = 200,
    tol: float = 1e-9,
    update: str = "procrustes",
    start: str = "best",
) -> GroupedSVDAggregate:
    """Shared factors and per-group ``s`` for ``M_g = Q_u C_g Q_v^T`` (``Q = None``: identity).

    ``start="pooled"``: orthonormal ALS from the pooled SVD (never worse than the pooled
    basis). ``start="best"`` also fits the *block start*, each group's own top
    ``global_rank // G`` triplets side by side with ``s`` zero off its block, which reaches
    every group's floor exactly at ``global_rank = G rank``, refines it by unconstrained
    CP-ALS (each step an exact least-squares solve, so the error never grows), and keeps
    it where its total error is smaller by more than rounding and no two of its columns
    terms are nearly parallel (:data:`MAX_COHERENCE`; the pooled fit's columns are orthonormal).
    """
    if start not in ("best", "pooled"):
        raise ValueError(f"unknown start {start!r}; use 'best' or 'pooled'")
    groups = cores.shape[0]
    target_norms = cores.flatten(1).norm(dim=1)
    floor_norms = torch.stack([torch.linalg.svdvals(c)[rank:].square().sum().sqrt() for c in cores])

    # The shared factors live in the cores' row/column spaces: at most min(m_u, m_v)
    # useful columns; any further ones are padded with zero singular values below.
    keep = min(global_rank, cores.shape[1], cores.shape[2])
    x, _, y_t = torch.linalg.svd(torch.einsum("g,gab->ab", shares, cores), full_matrices=False)
    x, y = x[:, :keep], y_t[:keep].T
    s = _fit_diagonals(x, y, cores)
    pooled_norms = _residual_norms(x, s, y, cores)
    sweeps = 0
    if groups > 1:  # for G = 1 the SVD is optimal (Eckart-Young): nothing to iterate
        x, s, y, sweeps = _als(cores, x, y, iterations, tol, update)
        if start == "best":
            block = _block_start(cores, rank, keep)
            if block is not None:
                bx, bs, by = _cp_als(cores, *block, iterations, tol)
                # The pooled fit has orthonormal columns, the CP fit need not (where the global
                # rank exceeds the data's, its blocks repeat directions): keep the pooled one
                # unless the block is better by more than rounding.
                margin = tol * float(cores.square().sum())
                if _residual_norms(bx, bs, by, cores).square().sum() < _residual_norms(x, s, y, cores).square().sum() - margin:
                    x, s, y = bx, bs, by
        x, s, y = _canonical_order(x, s, y, shares)
    residual_norms = _residual_norms(x, s, y, cores)

    u = x if q_u is None else q_u @ x
    v = y if q_v is None else q_v @ y
    if u.shape[1] < global_rank:
        width = u.shape[1]
        u = complete_basis(u, global_rank)
        v = complete_basis(v, global_rank)
        s = torch.cat([s, s.new_zeros(groups, global_rank - width)], dim=1)
    return GroupedSVDAggregate(u, s, v, residual_norms, floor_norms, pooled_norms, target_norms, sweeps)


def _block_start(cores: torch.Tensor, rank: int, width: int):
    """Each group's top ``rank`` triplets side by side; ``s`` zero off its block.

    Only where ``width >= G rank``, where it reaches every group's floor. With fewer columns
    per group than the floor's rank it fits one round's sum far better (100x less error at
    ``width = rank``, ``G = 2``) but as a degenerate CP fit: handed to Adam clients, those
    fits grew FairLoRA's adapter norms linearly round over round (8.3 after 10 rounds, 27.8
    after 30, ``tests/test_fairlora_stability.py``), so the pooled start is kept there.
    """
    groups = cores.shape[0]
    per = rank
    if groups * per > width:
        return None
    xs, ys = [], []
    s = cores.new_zeros(groups, groups * per)
    for g in range(groups):
        x, sigma, y_t = torch.linalg.svd(cores[g], full_matrices=False)
        xs.append(x[:, :per])
        ys.append(y_t[:per].T)
        s[g, g * per : (g + 1) * per] = sigma[:per]
    return torch.cat(xs, dim=1), s, torch.cat(ys, dim=1)


def _cp_als(cores, x, s, y, iterations: int, tol: float):
    """Unconstrained CP-ALS (``x``, ``s``, ``y`` each by exact least squares); the best iterate.

    Columns come back with unit-norm ``x`` and ``y``, their magnitude in ``s``. Iterates
    whose columns grow beyond twice the start's largest magnitude are not kept: unconstrained
    CP fits can degenerate into nearly cancelling columns of growing size, which as handed
    to clients made adapter norms grow round over round in a measured run.
    """
    total = cores.square().sum()
    best_err = _residual_norms(x, s, y, cores).square().sum()
    best = (x, s, y)
    limit = 2.0 * _column_sizes(x, s, y).max()
    for _ in range(iterations):
        x = _lstsq_factor(cores, y, s)
        y = _lstsq_factor(cores.transpose(1, 2), x, s)
        s = _lstsq_diagonals(cores, x, y)
        err = _residual_norms(x, s, y, cores).square().sum()
        if _column_sizes(x, s, y).max() > limit:
            break
        improved = best_err - err
        if err < best_err:
            best_err, best = err, (x, s, y)
        if improved <= tol * total:
            break
    x, s, y = best
    norm_x, norm_y = x.norm(dim=0), y.norm(dim=0)
    alive = (norm_x > 0) & (norm_y > 0)
    safe_x, safe_y = torch.where(alive, norm_x, 1.0), torch.where(alive, norm_y, 1.0)
    return x / safe_x, s * (safe_x * safe_y), y / safe_y


def _column_sizes(x, s, y):
    """Per column ``||x_j|| ||y_j|| max_g |s_gj|``."""
    return x.norm(dim=0) * y.norm(dim=0) * s.abs().amax(dim=0)


def _lstsq_factor(cores, other, s):
    """``argmin_x sum_g ||C_g - x diag(s_g) other^T||^2``."""
    rhs = ((cores @ other) * s[:, None, :]).sum(dim=0)  # a x R
    gram = (other.T @ other) * (s.T @ s)  # R x R: sum_g diag(s_g) O^T O diag(s_g)
    return rhs @ torch.linalg.pinv(gram, hermitian=True)


def _lstsq_diagonals(cores, x, y):
    """``argmin_s ||C_g - x diag(s_g) y^T||`` per group: ``((x^T x) * (y^T y)) s_g = diag(x^T C_g y)``."""
    gram = (x.T @ x) * (y.T @ y)
    rhs = ((cores @ y) * x).sum(dim=1)  # G x R
    return rhs @ torch.linalg.pinv(gram, hermitian=True)  # gram is symmetric


# --------------------------------------------------------------------------- magnitude policy

def balance_grouped_factors(
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    group_shares: Sequence[float] | torch.Tensor | None = None,
    cap: float | None = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each column's magnitude into ``U, V`` (as ``sqrt``) and keep ``S`` rows relative.

    The G = 1 policy (:func:`balance_factors`) sets ``S = 1``; with G > 1 one magnitude
    per column must serve all groups (docs/design.md, step 6, still open). Per column ``j``
    the magnitude moved out is

    ``m_j = max(sum_g pi_g |s_gj|, max_g |s_gj| / cap)``

    and ``U_j = u_j sqrt(m_j)``, ``V_j = v_j sqrt(m_j)``, ``S[:, j] = s[:, j] / m_j``. The
    product ``U diag(S[g]) V^T = u diag(s[g]) v^T`` is exact for every group.

    Trade-off: with the pooled mean alone (``cap=None``), a column only a small group
    uses keeps ``|S|`` near ``1 / pi_g``, and under Adam that group's product moves
    fastest (the measured instability). Clipping ``|S|`` at 1 instead would change the
    product on the clipped entries (a silent aggregation error); raising ``m_j`` until
    ``max_g |S[g, j]| = cap`` bounds ``|S|`` and keeps the product exact, at the price of
    larger ``U, V`` columns for the groups that use the column less. ``cap=1`` (default)
    normalises each column's largest group to 1 (then ``m_j = max_g |s_gj|``).

    Parameters
    ----------
    u, v : torch.Tensor
        Orthonormal columns (d_out x R, d_in x R).
    s : torch.Tensor
        (G x R) per-group singular values (may be negative).
    group_shares : (G,) array-like, optional
        Group shares ``pi_g`` (default uniform), normalised here.
    cap : float or None
        Largest ``|S|`` allowed (>= 1, since the pooled mean never exceeds the max);
        None for the pooled mean alone.

    Returns
    -------
    tuple of torch.Tensor
        ``U`` (d_out x R), ``S`` (G x R), ``V`` (d_in x R). Columns with no magnitude get
        ``U = 0``, ``S = 1`` and ``V`` of LoRA-init size, so their gradient reaches ``U``.
        For G = 1 and non-negative ``s`` this equals :func:`balance_factors`.
    """
    if s.dim() != 2 or s.shape[1] != u.shape[1] or v.shape[1] != u.shape[1]:
        raise ValueError(
            f"need u (d x R), s (G x R), v (d x R); got {tuple(u.shape)}, {tuple(s.shape)}, {tuple(v.shape)}"
        )
    if cap is not None and not cap >= 1.0:
        raise ValueError(f"cap {cap} must be >= 1 (or None)")
    shares = _check_shares(group_shares, s.shape[0], s.dtype, s.device)
    magnitude = shares @ s.abs()
    if cap is not None:
        magnitude = torch.maximum(magnitude, s.abs().amax(dim=0) / cap)
    dead = magnitude <= s.abs().max().clamp_min(torch.finfo(s.dtype).tiny) * torch.finfo(s.dtype).eps
    safe = torch.where(dead, torch.ones_like(magnitude), magnitude)
    root = safe.sqrt()
    big_u = torch.where(dead, torch.zeros_like(u), u * root)
    big_v = torch.where(dead, v * DEAD_COLUMN_NORM, v * root)
    big_s = torch.where(dead, torch.ones_like(s), s / safe)
    return big_u, big_s, big_v
