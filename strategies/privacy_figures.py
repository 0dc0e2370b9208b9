"""The sites' privacy figures (``dp_*`` train metrics) checked against the run's DP settings.

The federation's epsilon is the worst site's (:data:`fedlowrank.wire.METRIC_REDUCTIONS`), so a
single site could otherwise put any figure into it: ``dp_epsilon = 1e300`` in a run without DP,
or a target that is not the run's. The server cannot verify a site's noise, but it knows what an
honest site can report: nothing ``dp_*`` when the run asked no DP; the run's own target; an
epsilon spent of at most that target (a site stops before it would exceed it); ``dp_stopped``
0 or 1. A figure outside that is left out with the node named; the reply's update is not
touched (its weight and values have their own bounds). A site that reports no spend although
the run asked DP is named too: the federation's epsilon does not cover it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from logging import WARNING
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.common import log

from fedlowrank.wire import REPLY_NODE_KEY

from .replies import reply_metrics, weighted_metrics

PREFIX = "dp_"
# Room for float rounding between the accountant's figure and the configured target.
RELATIVE_SLACK = 1e-6


class PrivacyFigures:
    """A ``train_metrics_aggr_fn``: :func:`~strategies.replies.weighted_metrics` after :meth:`check`.

    Parameters
    ----------
    target_epsilon : float or None
        The run's ``dp-target-epsilon`` where it asked DP (``dp-noise-multiplier > 0``),
        None where it did not.
    """

    def __init__(self, target_epsilon: float | None) -> None:
        if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0 or None, got {target_epsilon!r}")
        self.target_epsilon = target_epsilon

    def __call__(self, records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        checked = []
        for record in records:
            node = record[REPLY_NODE_KEY]["node-id"] if REPLY_NODE_KEY in record.config_records else "?"
            metrics = self.check(reply_metrics(record), node)
            others = {k: v for k, v in record.items() if not isinstance(v, MetricRecord)}
            checked.append(RecordDict({**others, "metrics": MetricRecord(metrics)}))
        return weighted_metrics(checked, weighted_by_key)

    def check(self, metrics: Mapping[str, Any], node: Any) -> dict[str, Any]:
        """``metrics`` without the privacy figures an honest site could not have sent (logged with ``node``)."""
        kept = dict(metrics)
        for key in [k for k in kept if k.startswith(PREFIX)]:
            problem = self._problem(key, kept[key])
            if problem:
                log(WARNING, "Ignoring privacy figure '%s' from node %s: %s", key, node, problem)
                del kept[key]
        if self.target_epsilon is not None and "dp_epsilon" not in kept:
            log(WARNING, "Node %s reported no privacy spend (dp_epsilon) although the run asked DP: the "
                "federation's epsilon does not cover it", node)
        return kept

    def _problem(self, key: str, value: Any) -> str | None:
        target = self.target_epsilon
        if target is None:
            return "the run asked no DP (dp-noise-multiplier = 0)"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return f"{value!r} is not a finite number >= 0"
        if key == "dp_target_epsilon" and abs(value - target) > RELATIVE_SLACK * target:
            return f"target {value:g}, the run's is {target:g}"
        if key == "dp_epsilon" and value > target * (1 + RELATIVE_SLACK):
            return f"{value:g} spent is above the run's target {target:g} (a site stops before it)"
        if key == "dp_stopped" and value not in (0, 1):
            return f"{value!r} must be 0 or 1"
        return None
