"""Federated fairness statistics: merge equals pooled computation, AUC within the bin bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import accuracy_score, roc_auc_score

from fedlowrank.fairness import (
    federated_report,
    group_fairness_report,
    local_statistics,
    merge_statistics,
)

CONFUSION_KEYS = ("n", "acc", "es_acc", "es_acc_groups", "worst_group_acc", "dpd", "eod")


def make_case(seed: int, n: int = 1500, num_groups: int = 3):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, n)
    y = (rng.random(n) < 0.25 + 0.15 * (groups % 3)).astype(int)
    logits = 1.0 * y + 0.5 * groups - 0.7 + rng.normal(size=n)
    probs = 1.0 / (1.0 + np.exp(-logits))
    return y, probs, groups


def split_clients(seed: int, n: int, num_clients: int) -> list[np.ndarray]:
    """Uneven random partition of sample indices."""
    rng = np.random.default_rng(seed + 100)
    share = np.linspace(1, 2, num_clients)
    owner = rng.choice(num_clients, size=n, p=share / share.sum())
    return [np.flatnonzero(owner == c) for c in range(num_clients)]


def federate(y, p, g, num_groups, num_clients, seed=0, bins=1000, threshold=0.5):
    parts = split_clients(seed, len(y), num_clients)
    stats = [
        local_statistics(y[i], p[i], g[i], num_groups, bins=bins, threshold=threshold)
        for i in parts
    ]
    return federated_report(merge_statistics(stats))


def brute_xauc(pos: np.ndarray, neg: np.ndarray) -> float:
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize(
    "seed,num_groups,num_clients", [(0, 2, 3), (1, 3, 4), (2, 4, 3), (3, 3, 4)]
)
def test_merged_report_matches_pooled(seed, num_groups, num_clients):
    y, p, g = make_case(seed, num_groups=num_groups)
    threshold = 0.6
    fed = federate(y, p, g, num_groups, num_clients, seed=seed, threshold=threshold)
    pooled = group_fairness_report(y, p, g, threshold=threshold)
    pred = (p >= threshold).astype(int)

    # Confusion-based metrics are exact: equal to the pooled computation and to the
    # independent references.
    for key in CONFUSION_KEYS:
        assert fed[key] == pooled[key], key
    for k in range(num_groups):
        assert fed[f"acc_g{k}"] == pooled[f"acc_g{k}"]
        assert fed[f"n_g{k}"] == (g == k).sum()
    assert fed["acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert fed["dpd"] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=g), abs=1e-12
    )
    assert fed["eod"] == pytest.approx(
        equalized_odds_difference(y, pred, sensitive_features=g), abs=1e-12
    )

    # AUCs from histograms: within the returned bound of the exact pooled values, and the
    # bound is small at 1000 bins.
    tol = 1e-12
    assert abs(fed["auc"] - roc_auc_score(y, p)) <= fed["auc_bin_error_bound"] + tol
    assert 0 <= fed["auc_bin_error_bound"] < 2e-3
    exact_g = []
    for k in range(num_groups):
        m = g == k
        exact_g.append(roc_auc_score(y[m], p[m]))
        bound = fed[f"auc_bin_error_bound_g{k}"]
        assert abs(fed[f"auc_g{k}"] - exact_g[-1]) <= bound + tol
        assert bound < 5e-3
    for a in range(num_groups):
        for b in range(num_groups):
            if a != b:
                ref = brute_xauc(p[(g == a) & (y == 1)], p[(g == b) & (y == 0)])
                bound = fed[f"xauc_bin_error_bound_g{a}_g{b}"]
                assert abs(fed[f"xauc_g{a}_g{b}"] - ref) <= bound + tol
    exact_auc = roc_auc_score(y, p)
    exact_es = exact_auc / (1 + sum(abs(v - exact_auc) for v in exact_g))
    assert abs(fed["es_auc"] - exact_es) <= fed["es_auc_bin_error_bound"] + tol
    assert fed["es_auc_bin_error_bound"] < 0.02
    worst_err = abs(fed["worst_group_auc"] - min(exact_g))
    assert worst_err <= fed["worst_group_auc_bin_error_bound"] + tol
    assert set(pooled) <= set(fed)


@pytest.mark.parametrize("seed", range(6))
def test_bound_holds_with_coarse_bins(seed):
    # Few bins make same-bin pairs common, so the bound is actually tested.
    y, p, g = make_case(seed, n=600)
    fed = federate(y, p, g, 3, 3, seed=seed, bins=7)
    assert fed["auc_bin_error_bound"] > 0.01
    assert abs(fed["auc"] - roc_auc_score(y, p)) <= fed["auc_bin_error_bound"] + 1e-12
    for k in range(3):
        m = g == k
        err = abs(fed[f"auc_g{k}"] - roc_auc_score(y[m], p[m]))
        assert err <= fed[f"auc_bin_error_bound_g{k}"] + 1e-12


def test_bound_is_attained_when_all_pairs_share_a_bin():
    # Positives just above negatives, all in one bin: exact AUC 1, histogram AUC 1/2.
    y = np.array([0, 0, 1, 1])
    p = np.array([0.40, 0.41, 0.42, 0.43])
    fed = federated_report(local_statistics(y, p, np.zeros(4, dtype=int), 1, bins=2))
    assert fed["auc"] == 0.5 and fed["auc_bin_error_bound"] == 0.5
    assert abs(fed["auc"] - roc_auc_score(y, p)) == pytest.approx(fed["auc_bin_error_bound"])


def test_es_auc_bound_covers_disparity_hidden_inside_bins():
    # Even groups ranked perfectly, odd groups inverted, each group inside its own bin:
    # the histograms see no group disparity (every group AUC 1/2), the exact ES-AUC
    # does, so the bound must account for the group AUCs' errors, not only the overall.
    num_groups = 4
    g = np.repeat(np.arange(num_groups), 2)
    y = np.array([0, 1, 1, 0] * (num_groups // 2))
    p = g / num_groups + np.tile([0.05, 0.15], num_groups)
    fed = federated_report(local_statistics(y, p, g, num_groups, bins=num_groups))
    exact = group_fairness_report(y, p, g)
    assert [exact[f"auc_g{k}"] for k in range(num_groups)] == [1.0, 0.0, 1.0, 0.0]
    assert all(fed[f"auc_g{k}"] == 0.5 for k in range(num_groups))
    es_err = abs(fed["es_auc"] - exact["es_auc"])
    assert es_err > fed["auc_bin_error_bound"]  # the overall AUC's bound alone is too small
    assert es_err <= fed["es_auc_bin_error_bound"] + 1e-12


def test_histogram_bins_match_numpy_histogram():
    # np.histogram uses the same convention: [e_i, e_i+1), last bin closed.
    rng = np.random.default_rng(5)
    y, p, g = make_case(5, n=500)
    edges = np.sort(np.concatenate([[0.0, 1.0], rng.random(12)]))
    p = np.concatenate([p, edges])  # values exactly on every edge
    y = np.concatenate([y, np.ones(len(edges), dtype=int)])
    g = np.concatenate([g, np.zeros(len(edges), dtype=int)])
    stats = local_statistics(y, p, g, 3, bins=edges)
    np.testing.assert_array_equal(stats["bin_edges"], edges)
    for k in range(3):
        for label in (0, 1):
            ref, _ = np.histogram(p[(g == k) & (y == label)], bins=edges)
            np.testing.assert_array_equal(stats["hist"][k, label], ref)


def test_histogram_auc_is_exact_when_scores_sit_on_bin_centres():
    # Distinct values in distinct bins, equal values in one bin: the 1/2 rule is then
    # exactly the tie rule of the exact AUC.
    rng = np.random.default_rng(3)
    bins = 20
    centres = (np.arange(bins) + 0.5) / bins
    y = rng.integers(0, 2, 300)
    p = centres[np.clip(rng.integers(0, 8, 300) + 8 * y, 0, bins - 1)]
    g = rng.integers(0, 2, 300)
    fed = federated_report(local_statistics(y, p, g, 2, bins=bins))
    assert fed["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_merge_is_order_free_and_associative():
    y, p, g = make_case(11, n=600)
    parts = split_clients(11, len(y), 4)
    stats = [local_statistics(y[i], p[i], g[i], 3, bins=50) for i in parts]
    flat = merge_statistics(stats)
    nested = merge_statistics([merge_statistics(stats[:2]), merge_statistics(stats[2:][::-1])])
    pooled = local_statistics(y, p, g, 3, bins=50)
    for key in ("hist", "confusion", "bin_edges", "threshold"):
        np.testing.assert_array_equal(flat[key], pooled[key])
        np.testing.assert_array_equal(nested[key], pooled[key])


def test_client_missing_a_group_and_single_class_groups():
    y, p, g = make_case(12, n=900)
    y[g == 2] = 1  # group 2 has positives only
    parts = split_clients(12, len(y), 3)
    parts[0] = parts[0][g[parts[0]] != 0]  # client 0 never sees group 0
    keep = np.concatenate(parts)
    stats = [local_statistics(y[i], p[i], g[i], 3) for i in parts]
    fed = federated_report(merge_statistics(stats))
    assert math.isnan(fed["auc_g2"]) and math.isnan(fed["auc_bin_error_bound_g2"])
    assert math.isnan(fed["xauc_g0_g2"]) and not math.isnan(fed["xauc_g2_g0"])
    assert fed["es_auc_groups"] == 2.0
    pooled = group_fairness_report(y[keep], p[keep], g[keep], num_groups=3)
    for key in CONFUSION_KEYS:
        assert fed[key] == pooled[key], key


def test_statistics_are_plain_arrays_for_array_record():
    app = pytest.importorskip("flwr.app")
    y, p, g = make_case(13, n=300)
    stats = local_statistics(y, p, g, 3, bins=100)
    assert all(isinstance(v, np.ndarray) for v in stats.values())
    record = app.ArrayRecord(array_dict={k: app.Array(v) for k, v in stats.items()})
    back = {k: arr.numpy() for k, arr in record.items()}
    merged = merge_statistics([back, stats])
    np.testing.assert_array_equal(merged["hist"], 2 * stats["hist"])


def _stats():
    y, p, g = make_case(14, n=200)
    return local_statistics(y, p, g, 3, bins=10)


@pytest.mark.parametrize(
    "other,match",
    [
        (lambda s: {**s, "bin_edges": np.linspace(0, 1, 11) ** 2}, "bin_edges differ"),
        (lambda s: local_statistics(*make_case(15, n=50), 3, bins=20), "bin edges"),
        (lambda s: {**s, "threshold": np.array([0.3])}, "threshold"),
        (lambda s: local_statistics(*make_case(15, n=50, num_groups=2), 2, bins=10), "groups"),
    ],
)
def test_merge_rejects_incompatible_statistics(other, match):
    base = _stats()
    with pytest.raises(ValueError, match=match):
        merge_statistics([base, other(base)])


def _with(key, fn):
    s = _stats()
    s[key] = fn(s[key])
    return s


def _negative(h):
    h = h.copy()
    h[0, 0, 0] -= h[0, 0, 0] + 1
    return h


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda: _with("hist", lambda h: h[:, :, :-1]), r"expected \(G, 2, 10\)"),
        (lambda: _with("bin_edges", lambda e: e[:-1]), r"expected \(G, 2, 9\)"),
        (lambda: _with("confusion", lambda c: c[:2]), r"confusion has shape"),
        (lambda: _with("hist", _negative), "negative"),
        (lambda: _with("hist", lambda h: np.where(h == h.max(), np.nan, h)), "NaN"),
        (lambda: _with("hist", lambda h: h + 0.5), "whole counts"),
        (lambda: _with("bin_edges", lambda e: e[::-1]), "increasing"),
        (lambda: _with("bin_edges", lambda e: np.where(e == 0, np.nan, e)), "NaN"),
        (lambda: _with("confusion", lambda c: c + 1), "totals differ"),
        (lambda: {k: v for k, v in _stats().items() if k != "hist"}, "missing"),
    ],
)
def test_bad_statistics_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        federated_report(bad())
    with pytest.raises(ValueError, match=match):
        merge_statistics([_stats(), bad()])


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"groups": np.array([0, 1, 3])}, r"0\.\.2"),
        ({"probs": np.array([0.1, 1.2, 0.3])}, "outside the bin range"),
        ({"probs": np.array([0.1, np.nan, 0.3])}, "NaN"),
        ({"y_true": np.array([0, 1])}, "probs must be 1-D with 2"),
        ({"bins": 0}, "bins must be >= 1"),
        ({"bins": [0.0, 0.5, 0.4, 1.0]}, "increasing"),
    ],
)
def test_local_statistics_rejects_bad_input(kw, match):
    args = {"y_true": np.array([0, 1, 1]), "probs": np.array([0.1, 0.6, 1.0]),
            "groups": np.array([0, 1, 2]), "num_groups": 3, **kw}
    with pytest.raises(ValueError, match=match):
        local_statistics(**args)


def test_merge_rejects_empty_list():
    with pytest.raises(ValueError, match="at least one"):
        merge_statistics([])
