"""Group-fairness metrics: exact per-client reports and mergeable federated statistics.

Core module: numpy only (torch tensors are accepted as inputs), never imports flwr.
Reports are flat ``dict[str, float]`` (NaN where undefined) for a Flower
``MetricRecord``; statistics are ``dict[str, numpy.ndarray]`` for an ``ArrayRecord``.
See ``docs/fairness.md``.
"""

from .federated import (
    federated_report,
    histogram_auc,
    local_statistics,
    make_bin_edges,
    merge_statistics,
    validate_statistics,
)
from .metrics import (
    demographic_parity_from_counts,
    equalized_odds_from_counts,
    equity_scaled,
    group_fairness_report,
    pairwise_auc,
)

__all__ = [
    "demographic_parity_from_counts",
    "equalized_odds_from_counts",
    "equity_scaled",
    "federated_report",
    "group_fairness_report",
    "histogram_auc",
    "local_statistics",
    "make_bin_edges",
    "merge_statistics",
    "pairwise_auc",
    "validate_statistics",
]
