"""``fairlora-exact``: shared factors, one row of ``S`` per group, fitted to each group's sum."""

from __future__ import annotations

import torch

from ..grouped import fit_grouped
from ..ranks import Factors
from ..svd import orthonormal_range
from .base import Accumulator, AggregationRule, RuleResult, register_rule


@register_rule("fairlora-exact")
class FairLoRAExactRule(AggregationRule):
    """CP fit of ``M_g = sum_k w_kg U_k diag(S_k[g]) V_k^T`` with shared ``u, v``.

    ``w_kg`` are per-group sample counts, normalised per group. The fit starts from the
    better of the pooled SVD (orthonormal ALS) and the block start (each group's own top
    triplets side by side, refined by CP-ALS): at global rank ``G r`` the block start
    already reaches every group's rank-``r`` floor (:func:`fedlowrank.aggregation.grouped.fit_grouped`).

    Parameters
    ----------
    rank : int, optional
        The per-group rank ``r`` of the reported floor (default: the global rank).
    iterations : int (default: 200)
        Maximum ALS sweeps.
    start : {"best", "pooled"} (default: "best")
    """

    source = "FairLoRA (fedlowrank): exact per-group sums, CP-ALS with a block start"
    grouped = True
    residual = True
    residual_modes = ("drop", "carry")  # a per-group residual cannot be folded into one base

    def __init__(self, rank: int | None = None, iterations: int = 200, start: str = "best") -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.iterations = iterations
        self.start = start

    def accumulator(self, reference, shares=None, **kwargs):
        return GroupedExactAccumulator(self, reference, shares, **kwargs)


class GroupedExactAccumulator(Accumulator):
    def result(self, rank: int) -> RuleResult:
        total = self.sum.total
        shares = total / total.sum() if float(total.sum()) > 0 else torch.full_like(total, 1.0 / self.groups)
        per_group = min(self.rule.rank or rank, rank)
        if self.sum.dense:
            q_u = q_v = None
            cores = self.sum.matrices()
            stack = None
        else:
            stack = self.sum.stacked()
            q_u, r_u = orthonormal_range(stack.u, "qr")
            q_v, r_v = orthonormal_range(stack.v, "qr")
            cores = torch.einsum("am,gm,bm->gab", r_u, stack.s, r_v)
        agg = fit_grouped(q_u, q_v, cores, per_group, rank, shares, self.rule.iterations, start=self.rule.start)
        factors = Factors(agg.u, agg.s, agg.v)
        if stack is None:
            residual = cores - torch.einsum("ar,gr,br->gab", agg.u, agg.s, agg.v)
        else:  # exact, factored: the sum's columns next to the negated result
            residual = Factors(
                torch.cat([stack.u, agg.u], 1), torch.cat([stack.s, -agg.s], 1), torch.cat([stack.v, agg.v], 1)
            )
        return RuleResult(factors, True, agg.residual_norms, agg.target_norms, agg.floor_norms, residual)
