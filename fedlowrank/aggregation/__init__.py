"""Exact factored aggregation of low-rank adapters (docs/design.md, "Exact factored aggregation")."""

from .align import procrustes_align, signed_permutation_align
from .balance import balance_factors, lora_gauge_factors
from .grouped import (
    GroupedSVDAggregate,
    aggregate_grouped_svd,
    balance_grouped_factors,
    group_weights_from_counts,
)
from .svd import SVDAggregate, aggregate_svd, dense_weighted_sum
from .validate import check_client_factors

__all__ = [
    "GroupedSVDAggregate",
    "SVDAggregate",
    "aggregate_grouped_svd",
    "aggregate_svd",
    "balance_factors",
    "lora_gauge_factors",
    "balance_grouped_factors",
    "check_client_factors",
    "dense_weighted_sum",
    "group_weights_from_counts",
    "procrustes_align",
    "signed_permutation_align",
]
