"""Exact fairness metrics against independent references (sklearn, fairlearn, brute force)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from fairlearn.metrics import (
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate_difference,
    true_positive_rate_difference,
)
from sklearn.metrics import accuracy_score, roc_auc_score

from fedlowrank.fairness import group_fairness_report, pairwise_auc


def make_case(seed: int, n: int = 400, num_groups: int = 3, quantise: bool = True):
    """Random labels, groups and probabilities with group-dependent offsets and ties."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, n)
    y = (rng.random(n) < 0.3 + 0.1 * (groups % 3)).astype(int)
    logits = 1.2 * y + 0.4 * groups - 0.5 + rng.normal(size=n)
    probs = 1.0 / (1.0 + np.exp(-logits))
    if quantise:
        probs = np.round(probs, 2)  # many ties, so the 1/2 rule is exercised
    return y, probs, groups


def brute_xauc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Independent pairwise loop: P(pos > neg) + 1/2 P(pos == neg)."""
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else 0.5 if p == q else 0.0
    return total / (len(pos) * len(neg))


def fairlearn_quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def es(overall: float, per_group: list[float]) -> float:
    return overall / (1.0 + sum(abs(v - overall) for v in per_group))


@pytest.mark.parametrize("seed,num_groups", [(0, 2), (1, 3), (2, 4), (3, 3)])
def test_matches_sklearn_and_fairlearn(seed, num_groups):
    y, p, g = make_case(seed, num_groups=num_groups)
    threshold = 0.55
    pred = (p >= threshold).astype(int)
    r = group_fairness_report(y, p, g, threshold=threshold)

    assert r["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert r["acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    aucs, accs = [], []
    for k in range(num_groups):
        m = g == k
        aucs.append(roc_auc_score(y[m], p[m]))
        accs.append(accuracy_score(y[m], pred[m]))
        assert r[f"auc_g{k}"] == pytest.approx(aucs[-1], abs=1e-12)
        assert r[f"acc_g{k}"] == pytest.approx(accs[-1], abs=1e-12)
        assert r[f"n_g{k}"] == m.sum()
    assert r["es_auc"] == pytest.approx(es(roc_auc_score(y, p), aucs), abs=1e-12)
    assert r["es_acc"] == pytest.approx(es(accuracy_score(y, pred), accs), abs=1e-12)
    assert r["worst_group_auc"] == pytest.approx(min(aucs), abs=1e-12)
    assert r["worst_group_acc"] == pytest.approx(min(accs), abs=1e-12)
    assert r["dpd"] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=g), abs=1e-12
    )
    assert r["eod"] == pytest.approx(
        equalized_odds_difference(y, pred, sensitive_features=g, agg="worst_case"), abs=1e-12
    )


def test_xauc_matches_brute_force_for_every_ordered_pair():
    y, p, g = make_case(7, n=240, num_groups=3)
    r = group_fairness_report(y, p, g)
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
    assert {k for k in r if k.startswith("xauc_")} == {f"xauc_g{a}_g{b}" for a, b in pairs}
    for a, b in pairs:
        ref = brute_xauc(p[(g == a) & (y == 1)], p[(g == b) & (y == 0)])
        assert r[f"xauc_g{a}_g{b}"] == pytest.approx(ref, abs=1e-12)


def test_xauc_separates_offset_from_worse_service():
    # Each group ranked perfectly but group 1 shifted up: per-group AUCs are 1, pooled
    # AUC is hurt, and xAUC shows the offset (1 -> 0 ranks perfectly, 0 -> 1 badly).
    rng = np.random.default_rng(0)
    n = 200
    g = np.repeat([0, 1], n // 2)
    y = np.tile([0, 1], n // 2)
    p = 0.1 + 0.2 * y + 0.5 * g + 0.01 * rng.random(n)
    r = group_fairness_report(y, p, g)
    assert r["auc_g0"] == 1.0 and r["auc_g1"] == 1.0
    assert r["auc"] < 0.9
    assert r["xauc_g1_g0"] == 1.0 and r["xauc_g0_g1"] == 0.0


def test_pairwise_auc_counts_ties_half():
    assert pairwise_auc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5
    assert pairwise_auc(np.array([0.7]), np.array([0.5, 0.7, 0.9])) == pytest.approx(0.5)
    assert math.isnan(pairwise_auc(np.array([]), np.array([0.1])))


def test_logits_rank_like_probabilities():
    y, p, g = make_case(4, quantise=False)
    logits = np.log(p / (1 - p))
    rp = group_fairness_report(y, p, g, threshold=0.5)
    rl = group_fairness_report(y, logits, g, threshold=0.0)
    for key, value in rp.items():
        assert rl[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("only_label", [0, 1])
def test_single_class_group_is_nan_and_left_out_of_es_sum(only_label):
    y, p, g = make_case(5, num_groups=3)
    y = y.copy()
    y[g == 1] = only_label  # group 1 has one class only
    pred = (p >= 0.5).astype(int)
    r = group_fairness_report(y, p, g)

    assert math.isnan(r["auc_g1"])
    assert not math.isnan(r["acc_g1"])  # accuracy needs samples, not both classes
    # xAUC needs positives of the first group and negatives of the second.
    for a, b in [(1, 0), (1, 2), (0, 1), (2, 1)]:
        pos, neg = p[(g == a) & (y == 1)], p[(g == b) & (y == 0)]
        if len(pos) == 0 or len(neg) == 0:
            assert math.isnan(r[f"xauc_g{a}_g{b}"])
        else:
            assert r[f"xauc_g{a}_g{b}"] == pytest.approx(brute_xauc(pos, neg), abs=1e-12)
    defined = [roc_auc_score(y[g == k], p[g == k]) for k in (0, 2)]
    assert r["es_auc"] == pytest.approx(es(roc_auc_score(y, p), defined), abs=1e-12)
    assert r["es_auc_groups"] == 2.0 and r["es_acc_groups"] == 3.0
    assert r["worst_group_auc"] == pytest.approx(min(defined), abs=1e-12)

    # EOD: fairlearn would give group 1 a TPR (or FPR) of 0; we leave it out of that
    # rate's spread only, which equals fairlearn's difference on the groups where the
    # rate is defined.
    has_pos = (g != 1) | (only_label == 1)
    has_neg = (g != 1) | (only_label == 0)
    tpr = fairlearn_quiet(
        true_positive_rate_difference, y[has_pos], pred[has_pos], sensitive_features=g[has_pos]
    )
    fpr = fairlearn_quiet(
        false_positive_rate_difference, y[has_neg], pred[has_neg], sensitive_features=g[has_neg]
    )
    assert r["eod"] == pytest.approx(max(tpr, fpr), abs=1e-12)
    assert r["dpd"] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=g), abs=1e-12
    )


def test_empty_group_gets_nan_keys_and_no_effect_on_dpd():
    y, p, g = make_case(6, num_groups=2)
    pred = (p >= 0.5).astype(int)
    r = group_fairness_report(y, p, g, num_groups=4)
    for k in (2, 3):
        assert r[f"n_g{k}"] == 0.0
        assert math.isnan(r[f"auc_g{k}"]) and math.isnan(r[f"acc_g{k}"])
        assert math.isnan(r[f"xauc_g0_g{k}"]) and math.isnan(r[f"xauc_g{k}_g1"])
    assert r["dpd"] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=g), abs=1e-12
    )
    assert r["es_acc_groups"] == 2.0


def test_all_one_class_gives_nan_not_a_crash():
    g = np.array([0, 0, 1, 1])
    r = group_fairness_report(np.ones(4, dtype=int), np.array([0.2, 0.7, 0.4, 0.9]), g)
    assert math.isnan(r["auc"]) and math.isnan(r["es_auc"]) and math.isnan(r["worst_group_auc"])
    assert r["acc"] == 0.5 and not math.isnan(r["es_acc"])
    assert r["eod"] == pytest.approx(0.0)  # TPR spread 0.5 - 0.5; FPR undefined everywhere


def test_report_is_flat_python_floats():
    y, p, g = make_case(8)
    r = group_fairness_report(y, p, g, xauc=False)
    assert not any(k.startswith("xauc") for k in r)
    assert all(isinstance(k, str) and type(v) is float for k, v in r.items())


def test_metric_record_accepts_report_with_nan():
    app = pytest.importorskip("flwr.app")
    y, p, g = make_case(9)
    y[g == 0] = 1
    r = group_fairness_report(y, p, g)
    record = app.MetricRecord(r)
    assert math.isnan(record["auc_g0"])


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    y, p, g = make_case(10)
    r_np = group_fairness_report(y, p, g)
    r_t = group_fairness_report(torch.tensor(y), torch.tensor(p), torch.tensor(g))
    assert r_t == pytest.approx(r_np, nan_ok=True)


@pytest.mark.parametrize(
    "y,s,g,kw,match",
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], [0, 0, 1], {}, "only 0 and 1"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], [0, 0, 1], {}, "NaN"),
        ([0, 1, 1], [0.1, 0.2], [0, 0, 1], {}, "scores must be 1-D with 3"),
        ([0, 1, 1], [0.1, 0.2, 0.3], [0, 0], {}, "groups must be 1-D with 3"),
        ([0, 1, 1], [0.1, 0.2, 0.3], [0, 0, 2], {"num_groups": 2}, r"0\.\.1"),
        ([0, 1, 1], [0.1, 0.2, 0.3], [0, -1, 1], {}, "group ids"),
        ([0, 1, 1], [0.1, 0.2, 0.3], [0.0, 1.0, 1.0], {}, "integer ids"),
    ],
)
def test_bad_input_raises_value_error(y, s, g, kw, match):
    with pytest.raises(ValueError, match=match):
        group_fairness_report(np.array(y), np.array(s), np.array(g), **kw)


def test_core_does_not_import_flwr():
    code = "import sys, fedlowrank.fairness; assert 'flwr' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
