"""Exact factored aggregation of low-rank adapters (DESIGN.md, "Exact factored aggregation")."""

from .balance import balance_factors
from .svd import SVDAggregate, aggregate_svd, dense_weighted_sum
from .validate import check_client_factors

__all__ = [
    "SVDAggregate",
    "aggregate_svd",
    "balance_factors",
    "check_client_factors",
    "dense_weighted_sum",
]

from .grouped import (
    GroupedSVDAggregate,
    aggregate_grouped_svd,
    average_factors,
    balance_grouped_factors,
    fairfedmed_average,
    group_weights_from_counts,
)

__all__ += [
    "GroupedSVDAggregate",
    "aggregate_grouped_svd",
    "average_factors",
    "balance_grouped_factors",
    "fairfedmed_average",
    "group_weights_from_counts",
]
