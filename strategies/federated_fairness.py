"""Federation-wide fairness metrics from the statistics clients send with evaluate replies.

Clients put :func:`fedlowrank.fairness.local_statistics` (per-group, per-label score
histograms and confusion counts) into their evaluate reply as an extra ArrayRecord,
``"fairness-stats"`` by default. :class:`FederatedFairnessMetrics` is an
``evaluate_metrics_aggr_fn`` for any FedAvg-style strategy: it averages the
MetricRecords as Flower does, then merges the statistics and adds the federation-wide
report (:func:`fedlowrank.fairness.federated_report`) under ``fed-`` keys. The server
never sees a prediction; counts add, so the pooled AUC, ES-AUC, DPD and EOD are those
of all sites' test data together (AUCs within the reported binning bound).

A reply whose statistics are malformed (missing keys, wrong bins, wrong group count,
totals that disagree) is left out of the merge with a logged reason; its metrics still
enter the average and the round goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from logging import DEBUG, WARNING

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common import log

from fedlowrank.fairness import federated_report, make_bin_edges, merge_statistics, validate_statistics
from fedlowrank.fairness.federated import DEFAULT_BINS
from fedlowrank.wire import FAIRNESS_STATS_KEY, REPLY_NODE_KEY

from .replies import read_array, weighted_metrics

STATS_KEY = FAIRNESS_STATS_KEY
PREFIX = "fed-"
# Most groups one report takes: it has 2 G^2 cross-group keys, within a reply's 1,024 at 16.
MAX_GROUPS = 16
# Metrics logged each round (the rest land in the MetricRecord and the results file).
LOGGED = ("auc", "es_auc", "worst_group_auc", "dpd", "eod")


def reply_source(content: RecordDict, index: int) -> str:
    """``"node <id>"`` where the strategy tagged the reply (:data:`REPLY_NODE_KEY`), else its index."""
    if REPLY_NODE_KEY in content.config_records:
        return f"node {content.config_records[REPLY_NODE_KEY]['node-id']}"
    return f"reply {index}"


def reply_statistics(
    content: RecordDict, stats_key: str, bin_edges: np.ndarray, num_groups: int | None
) -> dict[str, np.ndarray]:
    """The statistics in one evaluate reply, checked against the expected bins and groups.

    Raises
    ------
    ValueError
        If the record is missing or malformed, or its bins or group count differ.
    """
    if stats_key not in content.array_records:
        raise ValueError(f"no ArrayRecord '{stats_key}' in the reply")
    record = content.array_records[stats_key]
    stats = validate_statistics({k: read_array(record[k], k) for k in record.keys()}, f"'{stats_key}'")
    edges = stats["bin_edges"]
    if edges.shape != bin_edges.shape or not np.allclose(edges, bin_edges, rtol=0, atol=1e-12):
        raise ValueError(
            f"histogram bins differ from the federation's: {edges.shape[0] - 1} bins on "
            f"[{edges[0]:g}, {edges[-1]:g}], expected {bin_edges.shape[0] - 1} on "
            f"[{bin_edges[0]:g}, {bin_edges[-1]:g}]"
        )
    if num_groups is not None and stats["hist"].shape[0] != num_groups:
        raise ValueError(f"statistics cover {stats['hist'].shape[0]} groups, expected {num_groups}")
    return stats


class FederatedFairnessMetrics:
    """``evaluate_metrics_aggr_fn``: weighted metric average plus federation-wide fairness.

    Parameters
    ----------
    bins : int or array-like (default: 1000)
        The bins every client uses in :func:`fedlowrank.fairness.local_statistics`;
        statistics on other bins are rejected (counts on different bins do not add).
    num_groups : int, optional
        Expected number of groups; None takes the count most valid replies have (at most
        :data:`MAX_GROUPS`), and leaves the others out.
    stats_key : str (default: "fairness-stats")
        Name of the ArrayRecord holding the statistics in evaluate replies.
    prefix : str (default: "fed-")
        Prefix of the federation-wide keys in the returned MetricRecord.
    base_fn : callable, optional
        How the MetricRecords themselves are aggregated (default:
        :func:`fedlowrank.strategies.replies.weighted_metrics`, Flower's weighted average
        normalised per metric).

    Notes
    -----
    Adds ``fed-<key>`` for every key of :func:`federated_report` (``fed-auc``,
    ``fed-es_auc``, ``fed-auc_g0``, ``fed-dpd``, ``fed-eod``, ``fed-xauc_g0_g1``, the bin
    error bounds, ...) and ``fed-sites`` (replies merged). Nothing is added when no
    reply carried valid statistics.
    """

    def __init__(
        self,
        bins: int | Sequence[float] | np.ndarray = DEFAULT_BINS,
        num_groups: int | None = None,
        stats_key: str = STATS_KEY,
        prefix: str = PREFIX,
        base_fn: Callable[[list[RecordDict], str], MetricRecord] = weighted_metrics,
    ) -> None:
        self.bin_edges = make_bin_edges(bins)
        if num_groups is not None and num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = num_groups
        self.stats_key = stats_key
        self.prefix = prefix
        self.base_fn = base_fn
        self.last_report: dict[str, float] | None = None

    def collect(self, records: list[RecordDict]) -> list[dict[str, np.ndarray]]:
        """Valid statistics of all replies; each rejected one is logged with its reason.

        Without ``num_groups`` the group count most replies agree on is the federation's (not the
        first reply's: one site answering first would otherwise set it for everyone)."""
        valid = []
        for i, content in enumerate(records):
            try:
                stats = reply_statistics(content, self.stats_key, self.bin_edges, self.num_groups)
                if stats["hist"].shape[0] > MAX_GROUPS:
                    raise ValueError(f"statistics cover {stats['hist'].shape[0]} groups, more than the {MAX_GROUPS} "
                                     "a federation report takes")
            except Exception as err:  # noqa: BLE001  (one site's statistics must not end the round)
                log(WARNING, "Fairness statistics of evaluate reply from %s left out: %s", reply_source(content, i), err)
                continue
            valid.append((i, content, stats))
        if not valid:
            return []
        groups = Counter(stats["hist"].shape[0] for _, _, stats in valid).most_common(1)[0][0]
        for i, content, stats in valid:
            if stats["hist"].shape[0] != groups:
                log(WARNING, "Fairness statistics of evaluate reply from %s left out: they cover %d groups, most "
                    "sites' %d", reply_source(content, i), stats["hist"].shape[0], groups)
        return [stats for _, _, stats in valid if stats["hist"].shape[0] == groups]

    def report(self, records: list[RecordDict]) -> dict[str, float] | None:
        """The federation-wide report of the valid statistics, or None if there are none."""
        collected = self.collect(records)
        if not collected:
            return None
        report = federated_report(merge_statistics(collected))
        report["sites"] = float(len(collected))
        return report

    def __call__(self, records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        metrics = self.base_fn(records, weighted_by_key)
        report = self.report(records)
        self.last_report = report
        if report is None:
            return metrics
        for key, value in report.items():
            metrics[f"{self.prefix}{key}"] = float(value)
        log(
            DEBUG,
            "federated fairness (%d sites): %s",
            int(report["sites"]),
            ", ".join(f"{k} {report[k]:.4f}" for k in LOGGED if k in report),
        )
        return metrics
