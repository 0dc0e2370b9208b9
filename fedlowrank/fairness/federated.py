"""Federation-wide fairness metrics from mergeable per-client statistics.

Each client summarises its predictions as

* ``hist`` (G, 2, B): counts of probabilities per group, per label (0, 1) and per bin
  on FIXED bin edges,
* ``confusion`` (G, 4): counts ``tn, fp, fn, tp`` per group at the decision threshold,
* ``bin_edges`` (B + 1,) and ``threshold`` (1,): part of the statistic, so that only
  statistics computed the same way are merged.

Counts add across clients, so the server obtains the pooled histograms and confusion
counts without seeing a single prediction. Confusion-based metrics (accuracy, ES-ACC,
DPD, EOD) are then exact. AUCs come from the histograms: pairs in different bins are
ordered exactly (bins are disjoint intervals); a positive and a negative in the same
bin are counted 1/2. The exact AUC counts such a pair as 0, 1/2 or 1, so

    |AUC_hist - AUC_exact| <= 1/2 * (pairs sharing a bin) / (n_pos * n_neg),

which the report returns next to every AUC (``*_bin_error_bound``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import (
    NAN,
    assemble_report,
    check_groups,
    check_labels,
    check_scores,
    confusion_counts,
    to_numpy,
)

DEFAULT_BINS = 1000
STAT_KEYS = ("bin_edges", "threshold", "hist", "confusion")


def make_bin_edges(bins: int | Sequence[float] | np.ndarray = DEFAULT_BINS) -> np.ndarray:
    """Bin edges: ``np.linspace(0, 1, bins + 1)`` for an int, else validated explicit edges."""
    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        return np.linspace(0.0, 1.0, int(bins) + 1)
    edges = np.asarray(bins, dtype=np.float64)
    _check_edges(edges)
    return edges


def _check_edges(edges: np.ndarray) -> None:
    if edges.ndim != 1 or edges.shape[0] < 2:
        raise ValueError(f"bin_edges must be 1-D with at least 2 edges, got shape {edges.shape}")
    if not np.isfinite(edges).all():
        raise ValueError("bin_edges contain NaN or infinite values")
    if not (np.diff(edges) > 0).all():
        raise ValueError("bin_edges must be strictly increasing")


def local_statistics(
    y_true: Any,
    probs: Any,
    groups: Any,
    num_groups: int,
    bins: int | Sequence[float] | np.ndarray = DEFAULT_BINS,
    threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """Mergeable statistics of one client's predictions.

    Parameters
    ----------
    y_true : array-like
        Binary labels (0/1), shape (n,).
    probs : array-like
        Scores inside the bin range, shape (n,); with the default bins, probabilities
        in [0, 1] (apply a sigmoid to logits first).
    groups : array-like
        Integer group id per sample in ``0..num_groups-1``.
    num_groups : int
        Number of groups ``G``; required so that every client sends the same shapes.
    bins : int or array-like (default: 1000)
        Number of equal-width bins on [0, 1], or explicit strictly increasing edges.
        All clients of one federation must use the same bins.
    threshold : float (default: 0.5)
        Decision threshold for the confusion counts (``probs >= threshold``).

    Returns
    -------
    dict of str to numpy.ndarray
        ``bin_edges`` (B+1,) float64, ``threshold`` (1,) float64, ``hist`` (G, 2, B)
        int64 indexed ``[group, label, bin]``, ``confusion`` (G, 4) int64 with columns
        ``tn, fp, fn, tp``. Plain arrays, ready for a Flower ``ArrayRecord``.
    """
    y = check_labels(y_true)
    p = check_scores(probs, y.shape[0], "probs")
    g, num_groups = check_groups(groups, num_groups, y.shape[0])
    edges = make_bin_edges(bins)
    outside = (p < edges[0]) | (p > edges[-1])
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} probs lie outside the bin range [{edges[0]}, {edges[-1]}] "
            "(pass probabilities, e.g. sigmoid(logits), or wider bins)"
        )
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")

    num_bins = edges.shape[0] - 1
    # Bins are [e_i, e_{i+1}); the top edge belongs to the last bin so p == 1 is kept.
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, num_bins - 1)
    flat = np.bincount((g * 2 + y) * num_bins + idx, minlength=num_groups * 2 * num_bins)
    y_pred = (p >= threshold).astype(np.int64)
    return {
        "bin_edges": edges.copy(),
        "threshold": np.array([float(threshold)]),
        "hist": flat.reshape(num_groups, 2, num_bins).astype(np.int64),
        "confusion": confusion_counts(y, y_pred, g, num_groups),
    }


def _as_counts(value: Any, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """Validate a count array (finite, integral, >= 0, given shape); return int64."""
    arr = to_numpy(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric counts, got dtype {arr.dtype}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if arr.dtype.kind == "f":
        if np.isnan(arr).any():
            raise ValueError(f"{name} contains NaN")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains infinite values")
        if (arr != np.round(arr)).any():
            raise ValueError(f"{name} must hold whole counts, found fractional values")
    if (arr < 0).any():
        raise ValueError(f"{name} contains negative counts")
    return arr.astype(np.int64)


def validate_statistics(stats: dict[str, Any], name: str = "statistics") -> dict[str, np.ndarray]:
    """Check one statistics dict for internal consistency; return it as clean numpy.

    Raises
    ------
    ValueError
        On missing keys, bad bin edges or threshold, shapes that do not match each
        other, NaN, negative or fractional counts, or histogram totals that disagree
        with the confusion counts.
    """
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        raise ValueError(f"{name} is missing {missing} (expected keys {list(STAT_KEYS)})")
    edges = to_numpy(stats["bin_edges"]).astype(np.float64)
    try:
        _check_edges(edges)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    threshold = to_numpy(stats["threshold"]).astype(np.float64)
    if threshold.shape != (1,) or not np.isfinite(threshold).all():
        raise ValueError(f"{name}: threshold must be one finite value, got {threshold!r}")
    num_bins = edges.shape[0] - 1
    hist_raw = to_numpy(stats["hist"])
    if hist_raw.ndim != 3 or hist_raw.shape[1:] != (2, num_bins):
        raise ValueError(
            f"{name}: hist has shape {hist_raw.shape}, expected (G, 2, {num_bins}) "
            f"for {num_bins} bins (bin_edges has {num_bins + 1} edges)"
        )
    num_groups = hist_raw.shape[0]
    hist = _as_counts(hist_raw, f"{name}: hist", None)
    confusion = _as_counts(stats["confusion"], f"{name}: confusion", (num_groups, 4))
    # Both summarise the same samples; disagreeing totals mean a corrupted or mixed-up
    # statistic, which would silently skew every metric.
    tn, fp, fn, tp = confusion.T
    if not (np.array_equal(hist[:, 0].sum(axis=1), tn + fp)
            and np.array_equal(hist[:, 1].sum(axis=1), fn + tp)):
        raise ValueError(
            f"{name}: per-group, per-label histogram totals differ from the confusion counts"
        )
    return {"bin_edges": edges, "threshold": threshold, "hist": hist, "confusion": confusion}


def merge_statistics(stats_list: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Sum client statistics into federation-wide statistics.

    Parameters
    ----------
    stats_list : sequence of dict
        Outputs of :func:`local_statistics` (or of earlier merges).

    Returns
    -------
    dict of str to numpy.ndarray
        Same keys and shapes as each input, counts summed.

    Raises
    ------
    ValueError
        If the list is empty, any entry is invalid (:func:`validate_statistics`), or
        entries differ in bin edges, threshold or number of groups.
    """
    if len(stats_list) == 0:
        raise ValueError("merge_statistics needs at least one statistics dict")
    first = validate_statistics(stats_list[0], "statistics[0]")
    hist, confusion = first["hist"].copy(), first["confusion"].copy()
    for i, raw in enumerate(stats_list[1:], start=1):
        other = validate_statistics(raw, f"statistics[{i}]")
        if other["bin_edges"].shape != first["bin_edges"].shape:
            raise ValueError(
                f"statistics[{i}] has {other['bin_edges'].shape[0]} bin edges, "
                f"statistics[0] has {first['bin_edges'].shape[0]}"
            )
        if not np.array_equal(other["bin_edges"], first["bin_edges"]):
            raise ValueError(f"statistics[{i}] bin_edges differ from statistics[0]")
        if not np.array_equal(other["threshold"], first["threshold"]):
            raise ValueError(
                f"statistics[{i}] threshold {other['threshold'][0]} differs from "
                f"statistics[0] threshold {first['threshold'][0]}"
            )
        if other["hist"].shape[0] != hist.shape[0]:
            raise ValueError(
                f"statistics[{i}] has {other['hist'].shape[0]} groups, "
                f"statistics[0] has {hist.shape[0]}"
            )
        hist += other["hist"]
        confusion += other["confusion"]
    return {
        "bin_edges": first["bin_edges"].copy(),
        "threshold": first["threshold"].copy(),
        "hist": hist,
        "confusion": confusion,
    }


def histogram_auc(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[float, float]:
    """AUC of positives against negatives from counts on the same bins.

    Returns
    -------
    tuple of (float, float)
        The AUC (same-bin pairs count 1/2) and its error bound, half the fraction of
        positive-negative pairs that share a bin. Both NaN if a side is empty.
    """
    pos = pos_hist.astype(np.float64)
    neg = neg_hist.astype(np.float64)
    n_pairs = float(pos.sum() * neg.sum())
    if n_pairs == 0:
        return NAN, NAN
    neg_below = np.cumsum(neg) - neg
    same_bin = float((pos * neg).sum())
    auc = (float((pos * neg_below).sum()) + 0.5 * same_bin) / n_pairs
    return auc, 0.5 * same_bin / n_pairs


def _es_auc_bound(auc: float, err: float, auc_g: np.ndarray, err_g: np.ndarray) -> float:
    """Worst-case change of ES-AUC when every AUC moves within its bound.

    ES = A / (1 + S), S = sum_g |A_g - A|, is increasing in A and decreasing in S; S
    moves by at most sum_g (err_g + err) over the groups in the sum.
    """
    defined = ~np.isnan(auc_g)
    if np.isnan(auc) or not defined.any():
        return NAN
    spread = float(np.abs(auc_g[defined] - auc).sum())
    slack = float((err_g[defined] + err).sum())
    es = auc / (1.0 + spread)
    hi = min(auc + err, 1.0) / (1.0 + max(spread - slack, 0.0))
    lo = max(auc - err, 0.0) / (1.0 + spread + slack)
    return float(max(hi - es, es - lo))


def federated_report(stats: dict[str, Any], xauc: bool = True) -> dict[str, float]:
    """Federation-wide fairness report from (merged) statistics.

    Parameters
    ----------
    stats : dict
        Output of :func:`merge_statistics` (or a single :func:`local_statistics`).
    xauc : bool (default: True)
        Include the cross-group AUC keys and their bounds.

    Returns
    -------
    dict of str to float
        Every key of :func:`fedlowrank.fairness.group_fairness_report` (AUCs from the
        histograms, the rest exact), plus the error bounds ``auc_bin_error_bound``,
        ``auc_bin_error_bound_g{g}``, ``es_auc_bin_error_bound``,
        ``worst_group_auc_bin_error_bound`` and ``xauc_bin_error_bound_g{a}_g{b}``.
        Undefined values are NaN.
    """
    clean = validate_statistics(stats)
    hist = clean["hist"]
    num_groups = hist.shape[0]
    auc, err = histogram_auc(hist[:, 1].sum(axis=0), hist[:, 0].sum(axis=0))
    per_group = [histogram_auc(hist[g, 1], hist[g, 0]) for g in range(num_groups)]
    auc_g = np.array([a for a, _ in per_group])
    err_g = np.array([e for _, e in per_group])
    cross = cross_err = None
    if xauc:
        pairs = [[histogram_auc(hist[a, 1], hist[b, 0]) for b in range(num_groups)]
                 for a in range(num_groups)]
        cross = np.array([[p[0] for p in row] for row in pairs])
        cross_err = np.array([[p[1] for p in row] for row in pairs])

    report = assemble_report(auc, auc_g, cross, clean["confusion"])
    report["auc_bin_error_bound"] = err
    report["es_auc_bin_error_bound"] = _es_auc_bound(auc, err, auc_g, err_g)
    # The minimum of values each within err_g moves by at most the largest err_g.
    defined = ~np.isnan(err_g)
    worst_err = float(err_g[defined].max()) if defined.any() else NAN
    report["worst_group_auc_bin_error_bound"] = worst_err
    for g in range(num_groups):
        report[f"auc_bin_error_bound_g{g}"] = float(err_g[g])
    if cross_err is not None:
        for a in range(num_groups):
            for b in range(num_groups):
                if a != b:
                    report[f"xauc_bin_error_bound_g{a}_g{b}"] = float(cross_err[a, b])
    return report
