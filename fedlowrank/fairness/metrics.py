"""Exact group-fairness metrics for binary classification.

Definitions (see ``docs/fairness.md``):

* AUC: probability that a random positive scores above a random negative, ties
  counting 1/2 (the Mann-Whitney statistic, computed from mid-ranks, so scores may be
  probabilities or logits).
* ES-AUC = AUC / (1 + sum_g |AUC_g - AUC|), ES-ACC likewise (FairFedMed / FairCLIP).
* xAUC(a, b): positives of group ``a`` ranked against negatives of group ``b``.
* DPD and EOD as in fairlearn (``demographic_parity_difference`` and
  ``equalized_odds_difference`` with ``agg='worst_case'``, ``method='between_groups'``).

NaN rule: a quantity whose definition needs samples that are absent (an AUC without
positives or negatives, an accuracy without samples, a TPR without positives, ...) is
``float('nan')``; NaN entries are left out of every sum, min and max built on top of
them (ES sums, worst group, DPD, EOD). Nothing returns None, so a report goes
straight into a Flower ``MetricRecord``.

Everything here works on per-group summaries (AUCs, confusion counts), so that the
federated report (:mod:`fedlowrank.fairness.federated`) reuses the same definitions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

NAN = float("nan")

# Column order of the (G, 4) confusion-count arrays, as sklearn's ``ravel()``.
CONFUSION_COLUMNS = ("tn", "fp", "fn", "tp")


def to_numpy(x: Any) -> np.ndarray:
    """Convert an array-like (numpy, list, torch tensor on any device) to numpy."""
    # Duck-typed so the metrics need no torch import; .detach().cpu() covers CUDA tensors.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    """Return ``y_true`` as a 1-D int64 array of 0/1, or raise ``ValueError``."""
    y = to_numpy(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric 0/1, got dtype {y.dtype}")
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise ValueError(f"{name} contains NaN")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        found = np.unique(y[bad])[:5].tolist()
        raise ValueError(f"{name} must contain only 0 and 1; found {found}")
    return y.astype(np.int64)


def check_scores(scores: Any, n: int, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a 1-D float64 array of ``n`` non-NaN values, or raise ``ValueError``."""
    s = to_numpy(scores)
    if s.ndim != 1 or s.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {s.shape}")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError(f"{name} contain NaN ({int(np.isnan(s).sum())} of {s.size})")
    return s


def check_groups(groups: Any, num_groups: int | None, n: int) -> tuple[np.ndarray, int]:
    """Validate group ids and infer the number of groups.

    Parameters
    ----------
    groups : array-like
        Integer group id per sample.
    num_groups : int or None
        Number of groups ``G``; ids must lie in ``0..G-1``. None infers ``max(id) + 1``.
    n : int
        Expected number of samples.

    Returns
    -------
    tuple of (numpy.ndarray, int)
        The ids as int64 and ``G``.
    """
    g = to_numpy(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(
            f"groups must be 1-D with {n} entries (one per sample), got shape {g.shape}"
        )
    if g.dtype.kind not in "biu":
        raise ValueError(f"groups must hold integer ids, got dtype {g.dtype}")
    g = g.astype(np.int64)
    if num_groups is None:
        if n == 0:
            raise ValueError("cannot infer num_groups from zero samples; pass num_groups")
        num_groups = int(g.max()) + 1
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    bad = (g < 0) | (g >= num_groups)
    if bad.any():
        raise ValueError(
            f"group ids must be in 0..{num_groups - 1}; found {sorted(set(g[bad].tolist()))[:5]}"
        )
    return g, int(num_groups)


def pairwise_auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Fraction of (positive, negative) pairs ranked correctly, ties counting 1/2.

    Computed from mid-ranks (Mann-Whitney U) in O(n log n), so it equals
    ``roc_auc_score`` on the same samples and works for xAUC (positives and negatives
    from different groups).

    Returns
    -------
    float
        NaN if either side is empty.
    """
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    if n_pos == 0 or n_neg == 0:
        return NAN
    both = np.concatenate([pos_scores, neg_scores]).astype(np.float64)
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # Mid-rank of each distinct value: ranks of ties are averaged, which is what makes
    # a tied pair count 1/2.
    upper = np.cumsum(counts)
    midrank = upper - (counts - 1) / 2.0
    rank_sum_pos = midrank[inverse[:n_pos]].sum()
    u_stat = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))


def confusion_counts(
    y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, num_groups: int
) -> np.ndarray:
    """Per-group confusion counts, shape (G, 4), columns ``tn, fp, fn, tp``."""
    cell = 2 * y_true + y_pred  # 0=tn, 1=fp, 2=fn, 3=tp
    flat = np.bincount(groups * 4 + cell, minlength=num_groups * 4)
    return flat.reshape(num_groups, 4).astype(np.int64)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den with NaN (not 0, not inf) where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, NAN)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _spread(values: np.ndarray) -> float:
    """max - min over the defined (non-NaN) values; NaN if none is defined."""
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return NAN
    return float(defined.max() - defined.min())


def equity_scaled(overall: float, per_group: np.ndarray) -> tuple[float, int]:
    """Equity-scaled metric ``overall / (1 + sum_g |per_group[g] - overall|)``.

    Groups whose metric is NaN are left out of the sum (their disparity is unknown,
    not zero). If ``overall`` is NaN or no group is defined the result is NaN: an
    equity score over no group would silently equal the plain metric.

    Returns
    -------
    tuple of (float, int)
        The scaled metric and the number of groups that entered the sum.
    """
    defined = per_group[~np.isnan(per_group)]
    if math.isnan(overall) or defined.size == 0:
        return NAN, int(defined.size)
    return float(overall / (1.0 + np.abs(defined - overall).sum())), int(defined.size)


def demographic_parity_from_counts(confusion: np.ndarray) -> float:
    """Demographic-parity difference from (G, 4) confusion counts.

    fairlearn's ``demographic_parity_difference``: max - min over groups of the
    selection rate ``(fp + tp) / n_g``. Groups without samples are absent (as in
    fairlearn, which only sees groups that occur).
    """
    tn, fp, fn, tp = confusion.T
    return _spread(_safe_ratio(fp + tp, tn + fp + fn + tp))


def equalized_odds_from_counts(confusion: np.ndarray) -> float:
    """Equalized-odds difference (``agg='worst_case'``) from (G, 4) confusion counts.

    ``max(TPR spread, FPR spread)``, spread = max - min over groups, as fairlearn.
    One deliberate difference: fairlearn sets the TPR of a group without positives
    (the FPR of a group without negatives) to 0, a made-up value that can dominate
    the difference. Here such a rate is undefined and that group is left out of that
    spread only. With every group holding both labels the two agree exactly.
    """
    tn, fp, fn, tp = confusion.T
    tpr_spread = _spread(_safe_ratio(tp, tp + fn))
    fpr_spread = _spread(_safe_ratio(fp, fp + tn))
    spreads = np.array([tpr_spread, fpr_spread])
    if np.isnan(spreads).all():
        return NAN
    return float(np.nanmax(spreads))


def _nanmin(values: np.ndarray) -> float:
    """Minimum over defined values; NaN (no warning) if none is defined."""
    defined = values[~np.isnan(values)]
    return float(defined.min()) if defined.size else NAN


def assemble_report(
    auc: float,
    auc_g: np.ndarray,
    xauc: np.ndarray | None,
    confusion: np.ndarray,
) -> dict[str, float]:
    """Build the flat ``str -> float`` report from per-group summaries.

    Parameters
    ----------
    auc : float
        Overall (pooled) AUC.
    auc_g : numpy.ndarray
        Per-group AUC, shape (G,), NaN where undefined.
    xauc : numpy.ndarray or None
        Cross-group AUC, shape (G, G); entry (a, b) ranks positives of ``a`` against
        negatives of ``b``. Only ``a != b`` is reported (the diagonal is ``auc_g``).
        None omits the xAUC keys.
    confusion : numpy.ndarray
        Per-group confusion counts, shape (G, 4), columns ``tn, fp, fn, tp``.

    Returns
    -------
    dict of str to float
        See :func:`group_fairness_report` for the keys.
    """
    num_groups = confusion.shape[0]
    tn, fp, fn, tp = confusion.T
    n_g = confusion.sum(axis=1)
    acc_g = _safe_ratio(tn + tp, n_g)
    n = int(n_g.sum())
    acc = float((tn + tp).sum() / n) if n > 0 else NAN
    es_auc, es_auc_groups = equity_scaled(auc, auc_g)
    es_acc, es_acc_groups = equity_scaled(acc, acc_g)

    report: dict[str, float] = {
        "n": float(n),
        "auc": float(auc),
        "acc": acc,
        "es_auc": es_auc,
        "es_acc": es_acc,
        "es_auc_groups": float(es_auc_groups),
        "es_acc_groups": float(es_acc_groups),
        "worst_group_auc": _nanmin(auc_g),
        "worst_group_acc": _nanmin(acc_g),
        "dpd": demographic_parity_from_counts(confusion),
        "eod": equalized_odds_from_counts(confusion),
    }
    for g in range(num_groups):
        report[f"n_g{g}"] = float(n_g[g])
        report[f"auc_g{g}"] = float(auc_g[g])
        report[f"acc_g{g}"] = float(acc_g[g])
    if xauc is not None:
        for a in range(num_groups):
            for b in range(num_groups):
                if a != b:
                    report[f"xauc_g{a}_g{b}"] = float(xauc[a, b])
    return report


def group_fairness_report(
    y_true: Any,
    scores: Any,
    groups: Any,
    threshold: float = 0.5,
    num_groups: int | None = None,
    xauc: bool = True,
) -> dict[str, float]:
    """Overall, per-group and equity-scaled metrics on one set of predictions.

    Parameters
    ----------
    y_true : array-like
        Binary labels (0/1), shape (n,).
    scores : array-like
        Scores, shape (n,): probabilities or logits. AUCs use ranks only; predictions
        for accuracy, DPD and EOD are ``scores >= threshold``.
    groups : array-like
        Integer group id per sample, in ``0..num_groups-1``.
    threshold : float (default: 0.5)
        Decision threshold on ``scores`` (use 0.0 for logits).
    num_groups : int, optional
        Number of groups ``G`` (default: ``max(groups) + 1``). Groups with no samples
        still get their keys, with NaN values.
    xauc : bool (default: True)
        Include the ``G * (G - 1)`` cross-group AUC keys.

    Returns
    -------
    dict of str to float
        ``n``, ``auc``, ``acc``, ``es_auc``, ``es_acc``, ``es_auc_groups`` and
        ``es_acc_groups`` (how many groups entered each ES sum), ``worst_group_auc``,
        ``worst_group_acc``, ``dpd``, ``eod``; per group ``n_g{g}``, ``auc_g{g}``,
        ``acc_g{g}``; per ordered pair ``a != b`` ``xauc_g{a}_g{b}``. Undefined values
        are NaN (module docstring).

    Raises
    ------
    ValueError
        On labels other than 0/1, NaN scores, mismatched lengths, or group ids outside
        ``0..num_groups-1``.
    """
    y = check_labels(y_true)
    s = check_scores(scores, y.shape[0])
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    g, num_groups = check_groups(groups, num_groups, y.shape[0])

    pos, neg = y == 1, y == 0
    auc = pairwise_auc(s[pos], s[neg])
    pos_by_group = [s[pos & (g == k)] for k in range(num_groups)]
    neg_by_group = [s[neg & (g == k)] for k in range(num_groups)]
    auc_g = np.array([pairwise_auc(pos_by_group[k], neg_by_group[k]) for k in range(num_groups)])
    cross = None
    if xauc:
        cross = np.array(
            [[pairwise_auc(pos_by_group[a], neg_by_group[b]) for b in range(num_groups)]
             for a in range(num_groups)]
        )
    y_pred = (s >= threshold).astype(np.int64)
    confusion = confusion_counts(y, y_pred, g, num_groups)
    return assemble_report(auc, auc_g, cross, confusion)
