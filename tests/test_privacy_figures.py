"""The federation's privacy figures hold only what an honest site could report in the run."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedlowrank.strategies import FedLowRank
from fedlowrank.strategies.privacy_figures import PrivacyFigures
from fedlowrank.strategies.testing import run_round, train_reply

RANK = 2


def arrays():
    rng = np.random.default_rng(0)
    return {"fc.lora_U": np.zeros((6, RANK)), "fc.lora_S": np.ones((1, RANK)), "fc.lora_V": rng.normal(size=(5, RANK))}


def round_metrics(target, replies_metrics, caplog):
    start = arrays()
    replies = [train_reply(node, {**start, "fc.lora_U": start["fc.lora_U"] + 0.01 * node}, 100.0, **metrics)
               for node, metrics in replies_metrics.items()]
    strategy = FedLowRank(rank=RANK, train_metrics_aggr_fn=PrivacyFigures(target))
    with caplog.at_level(logging.WARNING):
        _, metrics = run_round(strategy, start, replies)
    return metrics


def test_a_site_cannot_inflate_or_deflate_the_federations_epsilon_past_the_run_target(caplog):
    honest = {"dp_epsilon": 2.5, "dp_target_epsilon": 8.0, "dp_stopped": 0}
    metrics = round_metrics(8.0, {1: honest, 2: {**honest, "dp_epsilon": 3.0}, 3: {**honest, "dp_epsilon": 1e300},
                                  4: {**honest, "dp_target_epsilon": 1e9, "dp_stopped": 7}}, caplog)
    assert metrics["dp_epsilon"] == pytest.approx(3.0)  # the worst honest site, not 1e300
    assert metrics["dp_target_epsilon"] == pytest.approx(8.0) and metrics["dp_stopped"] == 0
    assert "'dp_epsilon' from node 3: 1e+300 spent is above the run's target 8" in caplog.text
    assert "'dp_target_epsilon' from node 4: target 1e+09, the run's is 8" in caplog.text
    assert "'dp_stopped' from node 4: 7 must be 0 or 1" in caplog.text
    assert metrics["agg-clients-kept"] == 4  # the figures are left out, the updates are not


def test_privacy_figures_in_a_run_without_dp_are_left_out_and_a_dp_run_names_a_site_without_them(caplog):
    metrics = round_metrics(None, {1: {}, 2: {"dp_epsilon": 0.5}}, caplog)
    assert "dp_epsilon" not in metrics
    assert "'dp_epsilon' from node 2: the run asked no DP" in caplog.text
    caplog.clear()
    metrics = round_metrics(4.0, {1: {"dp_epsilon": 1.0}, 2: {}}, caplog)
    assert metrics["dp_epsilon"] == pytest.approx(1.0)
    assert "Node 2 reported no privacy spend" in caplog.text and "Node 1 reported" not in caplog.text


@pytest.mark.parametrize("target", [0.0, -1.0, float("inf"), float("nan")])
def test_a_target_that_no_run_can_have_is_refused(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacyFigures(target)
