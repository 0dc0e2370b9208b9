"""Federation-wide fairness metrics merged on the server from evaluate replies."""

import logging

import numpy as np

from fedlowrank.wire import metric_reduction
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from sklearn.metrics import roc_auc_score

from fedlowrank.fairness import group_fairness_report, local_statistics
from fedlowrank.strategies import FederatedFairnessMetrics


def _site(rng, n, shift):
    groups = rng.integers(0, 2, n)
    y = rng.integers(0, 2, n)
    scores = 1 / (1 + np.exp(-(1.5 * y - 0.75 + shift * groups + rng.normal(0, 1, n))))
    return y, scores, groups


def _eval_reply(node, y, scores, groups, bins=1000):
    report = group_fairness_report(y, scores, groups, num_groups=2)
    metrics = {f"eval-{k}": float(v) for k, v in report.items() if k != "n"}
    metrics["num-examples"] = float(len(y))
    stats = local_statistics(y, scores, groups, 2, bins=bins)
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "fairness-stats": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.items()}),
    })
    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"i{node}", group_id="1", created_at=0.0, ttl=60.0,
                        message_type="evaluate")
    return Message(content=content, metadata=metadata)


@pytest.fixture
def sites():
    rng = np.random.default_rng(0)
    return [_site(rng, n, shift) for n, shift in ((400, 0.8), (250, -0.5), (600, 0.2))]


def test_fedavg_with_federated_metrics_matches_pooled_predictions(sites):
    strategy = FedAvg(evaluate_metrics_aggr_fn=FederatedFairnessMetrics(num_groups=2))
    metrics = strategy.aggregate_evaluate(1, [_eval_reply(k + 1, *s) for k, s in enumerate(sites)])
    y, scores, groups = (np.concatenate(parts) for parts in zip(*sites))
    pred = (scores >= 0.5).astype(int)
    # Confusion-based metrics are exact; fairlearn is the independent reference.
    assert metrics["fed-dpd"] == pytest.approx(demographic_parity_difference(y, pred, sensitive_features=groups), abs=1e-12)
    assert metrics["fed-eod"] == pytest.approx(equalized_odds_difference(y, pred, sensitive_features=groups), abs=1e-12)
    # AUCs from histograms are within their reported bound of the exact pooled AUCs.
    assert abs(metrics["fed-auc"] - roc_auc_score(y, scores)) <= metrics["fed-auc_bin_error_bound"] + 1e-12
    for g in (0, 1):
        exact = roc_auc_score(y[groups == g], scores[groups == g])
        assert abs(metrics[f"fed-auc_g{g}"] - exact) <= metrics[f"fed-auc_bin_error_bound_g{g}"] + 1e-12
    exact_report = group_fairness_report(y, scores, groups, num_groups=2)
    assert abs(metrics["fed-es_auc"] - exact_report["es_auc"]) <= metrics["fed-es_auc_bin_error_bound"] + 1e-12
    assert metrics["fed-sites"] == 3 and metrics["fed-n"] == len(y)
    # The pooled AUC is not the average of local AUCs (why the statistics are merged).
    assert metrics["fed-auc"] != pytest.approx(metrics["eval-auc"], abs=1e-4)


def test_wrong_bins_are_left_out_with_a_logged_reason(sites, caplog):
    aggr = FederatedFairnessMetrics(num_groups=2)
    replies = [_eval_reply(1, *sites[0]), _eval_reply(2, *sites[1], bins=50), _eval_reply(3, *sites[2])]
    broken = _eval_reply(4, *sites[1])
    broken.content["fairness-stats"]["hist"] = Array(np.zeros((3, 2, 1000), dtype=np.int64))
    strategy = FedAvg(evaluate_metrics_aggr_fn=aggr)
    with caplog.at_level(logging.WARNING):
        metrics = strategy.aggregate_evaluate(1, replies + [broken])
    assert "histogram bins differ" in caplog.text and "50 bins" in caplog.text
    assert "confusion has shape (2, 4), expected (3, 4)" in caplog.text
    y, scores, groups = (np.concatenate(parts) for parts in zip(sites[0], sites[2]))
    assert metrics["fed-sites"] == 2 and metrics["fed-n"] == len(y)
    pred = (scores >= 0.5).astype(int)
    assert metrics["fed-dpd"] == pytest.approx(demographic_parity_difference(y, pred, sensitive_features=groups))
    assert "eval-auc" in metrics  # the plain average still includes every reply


def test_no_statistics_leaves_flower_average_unchanged(sites):
    replies = [_eval_reply(k + 1, *s) for k, s in enumerate(sites)]
    for msg in replies:
        del msg.content["fairness-stats"]
    with_helper = FedAvg(evaluate_metrics_aggr_fn=FederatedFairnessMetrics()).aggregate_evaluate(1, replies)
    plain = FedAvg().aggregate_evaluate(1, replies)
    # Normalised per metric: the same mean when every reply has every metric (up to rounding);
    # sample counts are summed over the sites instead of averaged into fractions.
    counts = {k for k in plain.keys() if metric_reduction(k) == "sum"}
    assert counts == {"eval-n_g0", "eval-n_g1"}
    for key in counts:
        assert with_helper[key] == sum(next(iter(m.content.metric_records.values()))[key] for m in replies)
    assert {k: v for k, v in with_helper.items() if k not in counts} == pytest.approx(
        {k: v for k, v in plain.items() if k not in counts}, rel=1e-12)
