"""``exact``: the best rank-``r`` approximation of the weighted sum, computed factored."""

from __future__ import annotations

import torch

from ..accumulate import top_rank
from ..ranks import Factors
from .base import Accumulator, AggregationRule, RuleResult, register_rule


@register_rule("exact")
class ExactRule(AggregationRule):
    """FlexLoRA's target, ``svd_r(sum_k w_k U_k diag(s_k) V_k^T)``, without the dense matrix.

    Factored (stacked QR / Gram and a small core SVD) while the stacked width is below
    half the layer's size, dense accumulation with a subspace-iteration top-``r`` beyond
    (:mod:`fedlowrank.aggregation.accumulate`); both exact to rounding.

    Parameters
    ----------
    method : {"gram", "qr"} (default: "gram")
        How the stacked factors are orthonormalised in the factored path.
    """

    source = "FlexLoRA (Bai et al., NeurIPS 2024): SVD of the weighted sum of products"
    residual = True

    def __init__(self, method: str = "gram") -> None:
        if method not in ("gram", "qr"):
            raise ValueError(f"unknown method {method!r}; use 'gram' or 'qr'")
        self.method = method

    def accumulator(self, reference, shares=None, **kwargs):
        return ExactAccumulator(self, reference, shares, **kwargs)


class ExactAccumulator(Accumulator):
    def result(self, rank: int) -> RuleResult:
        top = top_rank(self.sum, rank, self.rule.method, residual=True)
        return RuleResult(
            top.factors, True, top.truncated_norm.reshape(1), top.target_norm.reshape(1), residual=top.residual
        )


@register_rule("flexlora-dense")
class FlexLoRADenseRule(AggregationRule):
    """FlexLoRA as published: form the dense weighted sum, take its full SVD. Reference only.

    Costs a dense ``d_out x d_in`` matrix and an ``O(d^3)`` SVD per layer; ``exact`` gives
    the same result factored (``docs/benchmarks.md``).
    """

    source = "FlexLoRA (Bai et al., NeurIPS 2024), as published: dense sum + full SVD"
    residual = True

    def accumulator(self, reference, shares=None, **kwargs):
        kwargs["dense_above"] = 0
        return DenseAccumulator(self, reference, shares, **kwargs)


class DenseAccumulator(Accumulator):
    def result(self, rank: int) -> RuleResult:
        m = self.sum.matrices()[0]
        u, s, v_t = torch.linalg.svd(m, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], v_t[:rank].T
        rest = m - (u * s) @ v.T
        return RuleResult(Factors(u, s[None], v), True, rest.norm().reshape(1), m.norm().reshape(1), residual=rest[None])
