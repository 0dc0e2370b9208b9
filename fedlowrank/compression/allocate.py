"""The L-GreCo allocator: one compression setting per layer under an error budget.

L-GreCo (Alimohammadi et al., 2023) picks, for each layer ``l``, a candidate
``c_l`` minimising the total encoded size ``sum_l sizes[l, c_l]`` subject to
``sum_l errors[l, c_l] <= budget``. It is a multiple-choice knapsack; we solve
it by dynamic programming over errors discretised into ``num_bins`` bins of
width ``budget / num_bins``. Errors are rounded *up* to whole bins, so any
choice the DP accepts has a true total error within the budget.

Exactness: every choice whose rounded-up total fits ``num_bins`` is feasible,
and the DP finds the smallest of them. Rounding up can only hide a choice
whose true error is within ``num_layers * budget / num_bins`` of the budget,
so the result's size lies between the brute-force optimum at ``budget`` and
the brute-force optimum at ``budget * (1 - num_layers / num_bins)``; with fine
bins the two nearly always coincide. Two extras narrow the gap further while
keeping every returned choice within budget (checked on the true errors):
cells up to ``num_bins + num_layers`` are kept and accepted when their true
total fits, and the uniform settings (one candidate for all layers) are
always considered, so the default at ``alpha = 1`` is never lost to
rounding.
"""

from __future__ import annotations

import numpy as np

DEFAULT_NUM_BINS = 1000


def lgreco_budget(errors: np.ndarray, default_index: int, alpha: float = 1.0) -> float:
    """The L-GreCo error budget: ``alpha`` times the uniform default's total error.

    Parameters
    ----------
    errors : np.ndarray
        ``(layers, candidates)`` error table.
    default_index : int
        Column of the uniform default setting.
    alpha : float, default 1.0
        Slack; 1.0 means "no worse than the default in total error".

    Returns
    -------
    float
    """
    errors = _check_table("errors", errors)
    if not 0 <= default_index < errors.shape[1]:
        raise ValueError(f"default_index {default_index} out of range for {errors.shape[1]} candidates.")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}.")
    return float(alpha * errors[:, default_index].sum())


def feedback_errors(errors: np.ndarray, energy: np.ndarray, max_ratio: float = 0.99) -> np.ndarray:
    """The error each setting settles at under error feedback, per tensor.

    A client compresses ``x = u + e`` (update plus residual) and keeps
    ``e <- x - decode(C(x))``. If a setting loses the fraction ``rho`` of
    the energy it is given (``||x - C(x)||^2 = rho ||x||^2``) and the residual
    is roughly uncorrelated with the next update, the residual settles where
    ``E = rho (||u||^2 + E)``, i.e. at ``E = rho / (1 - rho) * ||u||^2``. A
    one-shot table reports ``rho ||x||^2`` instead, which is what a setting
    loses *this* round; it underrates the lossy settings (Top-K 5% with
    ``rho = 0.9`` settles at 9 ``||u||^2``, not 0.9 ``||u||^2``), and the
    allocator, trusting it, puts small tensors on them and watches the error
    climb round by round as their residuals grow. Budgeting with the
    settled error removes that bias. For the setting a tensor already uses,
    once its residual has settled (``||x||^2 = ||u||^2 / (1 - rho)``), both
    forms agree.

    Parameters
    ----------
    errors : np.ndarray
        ``(layers, candidates)`` squared errors measured on ``x``.
    energy : np.ndarray
        ``(layers, 2)``: ``||u||^2`` and ``||x||^2`` per layer.
    max_ratio : float, default 0.99
        ``rho`` is capped here (a setting that loses everything would settle
        at an infinite residual; the cap makes it 99x ``||u||^2``).

    Returns
    -------
    np.ndarray
        Float64 ``(layers, candidates)`` settled errors.
    """
    errors = _check_table("errors", errors)
    energy = np.asarray(energy, dtype=np.float64)
    if energy.shape != (errors.shape[0], 2) or not np.all(np.isfinite(energy)) or np.any(energy < 0):
        raise ValueError(f"energy must be a finite, non-negative ({errors.shape[0]}, 2) table, got {energy.shape}.")
    if not 0 < max_ratio < 1:
        raise ValueError(f"max_ratio must be in (0, 1), got {max_ratio!r}.")
    update, target = energy[:, :1], energy[:, 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(target > 0, errors / np.where(target > 0, target, 1.0), 0.0)
    rho = np.minimum(rho, max_ratio)
    return rho / (1.0 - rho) * update


def lgreco_allocate(
    errors: np.ndarray, sizes: np.ndarray, budget: float, num_bins: int = DEFAULT_NUM_BINS
) -> np.ndarray:
    """Choose one candidate per layer: minimum total size, total error <= budget.

    Parameters
    ----------
    errors, sizes : np.ndarray
        ``(layers, candidates)`` tables, finite and non-negative.
    budget : float
        Upper bound on the total error (>= 0).
    num_bins : int, default 1000
        Error discretisation; cost is ``O(layers * candidates * num_bins)``.

    Returns
    -------
    np.ndarray
        Int64 candidate index per layer. Among equally small choices the one
        with the smaller (discretised) total error wins.

    Raises
    ------
    ValueError
        On shape mismatch, NaN/inf/negative entries, a bad budget or bin
        count, or when no choice fits the budget.
    """
    errors = _check_table("errors", errors)
    sizes = _check_table("sizes", sizes)
    if errors.shape != sizes.shape:
        raise ValueError(f"errors {errors.shape} and sizes {sizes.shape} must have the same shape.")
    if not np.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be finite and >= 0, got {budget!r}.")
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}.")
    bins = _discretise(errors, budget, int(num_bins))
    layers = errors.shape[0]
    # Rounded-up totals up to num_bins are feasible by construction. Paths up
    # to num_bins + layers may still be feasible (each layer rounds up by less
    # than one bin); keep them as candidates and check their true totals.
    choice = _knapsack(bins, errors, sizes, int(num_bins) + layers, budget)
    # The uniform settings are always admissible references, so the result is
    # never larger than the best uniform setting that fits (e.g. the default
    # at alpha = 1, which sits exactly on the budget).
    rows = np.arange(layers)
    for c in range(errors.shape[1]):
        if errors[:, c].sum() <= budget and (
            choice is None or sizes[:, c].sum() < sizes[rows, choice].sum()
        ):
            choice = np.full(layers, c, dtype=np.int64)
    if choice is None:
        raise ValueError(
            f"No allocation fits the error budget {budget:.6g}: the smallest possible total error is "
            f"{errors.min(axis=1).sum():.6g}."
        )
    return choice


def allocate_or_uniform(
    errors: np.ndarray,
    sizes: np.ndarray,
    budget: float,
    table_cost: float = 0.0,
    num_bins: int = DEFAULT_NUM_BINS,
) -> tuple[np.ndarray, int | None]:
    """The allocation, unless a uniform candidate within budget costs less once tables are paid.

    Per-layer settings need error tables, which clients send on top of their update;
    a uniform setting chosen once needs none. ``table_cost`` is what keeping the
    per-layer allocation costs in tables per round (e.g. one table's bytes divided by
    the rounds between allocations). The result never sends more than the best uniform
    candidate whose total error meets ``budget``: if that candidate's size is below the
    allocation's size plus ``table_cost``, it is returned instead.

    Returns
    -------
    (choice, uniform)
        The candidate index per layer, and the uniform candidate's index when the
        fallback was taken (``None`` otherwise).
    """
    choice = lgreco_allocate(errors, sizes, budget, num_bins)
    errors, sizes = np.asarray(errors, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    cost = float(sizes[np.arange(len(choice)), choice].sum()) + float(table_cost)
    feasible = [c for c in range(errors.shape[1]) if errors[:, c].sum() <= budget]
    if not feasible:
        return choice, None
    best = min(feasible, key=lambda c: sizes[:, c].sum())
    if sizes[:, best].sum() < cost:
        return np.full(len(choice), best, dtype=np.int64), best
    return choice, None


def _check_table(label: str, table: np.ndarray) -> np.ndarray:
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"{label} must be a non-empty (layers, candidates) table, got shape {table.shape}.")
    if not np.all(np.isfinite(table)):
        raise ValueError(f"{label} contains NaN or inf.")
    if np.any(table < 0):
        raise ValueError(f"{label} contains negative entries.")
    return table


def _discretise(errors: np.ndarray, budget: float, num_bins: int) -> np.ndarray:
    """Errors in whole bins, rounded up; ``num_bins + 1`` marks 'never fits'."""
    never = num_bins + 1
    if budget == 0:
        return np.where(errors == 0, 0, never).astype(np.int64)
    width = budget / num_bins
    with np.errstate(over="ignore"):
        scaled = errors / width
    bins = np.ceil(np.minimum(scaled, never)).astype(np.int64)
    # ceil of a float quotient can land one bin low; the bound must hold.
    bins = np.where(bins * width < errors, bins + 1, bins)
    return np.minimum(bins, never)


def _knapsack(
    bins: np.ndarray, errors: np.ndarray, sizes: np.ndarray, capacity: int, budget: float
) -> np.ndarray | None:
    """Multiple-choice knapsack DP over error bins.

    Each cell ``b`` holds the smallest size of a path using exactly ``b``
    bins (ties: smaller true error) and that path's true error. Returns the
    smallest-size path whose true total error is within ``budget``, or
    ``None`` if no cell has one.
    """
    layers, cands = bins.shape
    best = np.full(capacity + 1, np.inf)
    best_err = np.full(capacity + 1, np.inf)
    best[0] = best_err[0] = 0.0
    picks = np.zeros((layers, capacity + 1), dtype=np.int64)
    for layer in range(layers):
        new = np.full(capacity + 1, np.inf)
        new_err = np.full(capacity + 1, np.inf)
        for c in range(cands):
            w = int(bins[layer, c])
            if w > capacity:
                continue
            size = np.full(capacity + 1, np.inf)
            err = np.full(capacity + 1, np.inf)
            size[w:] = best[: capacity + 1 - w] + sizes[layer, c]
            err[w:] = best_err[: capacity + 1 - w] + errors[layer, c]
            better = (size < new) | ((size == new) & (err < new_err))
            new[better], new_err[better] = size[better], err[better]
            picks[layer, better] = c
        best, best_err = new, new_err
    feasible = np.isfinite(best) & (best_err <= budget)
    if not feasible.any():
        return None
    # Smallest size among feasible cells; ties go to the smaller true error.
    order = np.lexsort((best_err, np.where(feasible, best, np.inf)))
    b = int(order[0])
    choice = np.zeros(layers, dtype=np.int64)
    for layer in range(layers - 1, -1, -1):
        c = picks[layer, b]
        choice[layer] = c
        b -= int(bins[layer, c])
    return choice
