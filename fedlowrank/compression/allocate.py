"""The L-GreCo allocator: one compression setting per layer under an error budget.

L-GreCo (Alimohammadi et al., 2023) picks, for each layer ``l``, a candidate
``c_l`` minimising the total encoded size ``sum_l sizes[l, c_l]`` subject to
``sum_l errors[l, c_l] <= budget``. It is a multiple-choice knapsack; we solve
it by dynamic programming over errors discretised into ``num_bins`` bins of
width ``budget / num_bins``. Errors are rounded *up* to whole bins, so any
choice the DP accepts has a true total error within the budget.

Exactness: the DP is exact for the rounded problem. Rounding up can only
exclude a choice whose true error is within ``num_layers * budget / num_bins``
of the budget, so the DP's size lies between the brute-force optimum at
``budget`` and the brute-force optimum at ``budget * (1 - num_layers /
num_bins)``; with fine bins the two nearly always coincide.
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
    capacity = int(num_bins)
    # Float rounding of bins * width could, in a corner case, let the true
    # total creep past the budget; shrink the capacity until it does not.
    while capacity >= 0:
        choice = _knapsack(bins, sizes, capacity)
        if choice is None:
            break
        if errors[np.arange(len(choice)), choice].sum() <= budget:
            return choice
        capacity -= 1
    raise ValueError(
        f"No allocation fits the error budget {budget:.6g}: the smallest possible total error is "
        f"{errors.min(axis=1).sum():.6g}."
    )


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


def _knapsack(bins: np.ndarray, sizes: np.ndarray, capacity: int) -> np.ndarray | None:
    """Multiple-choice knapsack DP; ``None`` if nothing fits ``capacity``."""
    layers, cands = bins.shape
    # best[b]: least size of the layers so far using exactly b bins.
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((layers, capacity + 1), dtype=np.int64)
    for layer in range(layers):
        new = np.full(capacity + 1, np.inf)
        for c in range(cands):
            w = bins[layer, c]
            if w > capacity:
                continue
            shifted = np.full(capacity + 1, np.inf)
            shifted[w:] = best[: capacity + 1 - w] + sizes[layer, c]
            better = shifted < new
            new[better] = shifted[better]
            picks[layer, better] = c
        best = new
    if not np.isfinite(best).any():
        return None
    # Smallest size; ties go to the smallest used error (argmin takes the first).
    b = int(np.argmin(best))
    choice = np.zeros(layers, dtype=np.int64)
    for layer in range(layers - 1, -1, -1):
        c = picks[layer, b]
        choice[layer] = c
        b -= int(bins[layer, c])
    return choice
