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
    residual_modes = ("drop", "carry", "fold")

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
    residual_modes = ("drop", "carry", "fold")

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


@register_rule("flora")
class FLoRARule(AggregationRule):
    """FLoRA: the clients' weighted sum is stacked exactly and folded into the base.

    The whole round's sum (no truncation, any mix of ranks) goes into the base correction
    that clients load (residual mode ``fold``), and the adapter restarts from a fresh LoRA
    initialisation (``U = 0``, ``V`` uniform in ``+-1/sqrt(d_in)``, ``S = 1``) each round.
    Exact; the price is the fold's bytes, up to a dense layer's worth each round.

    Parameters
    ----------
    seed : int (default: 0)
        Seeds each round's fresh ``V`` (with the accumulator's per-round, per-layer seed).
    """

    source = "FLoRA (Wang et al., NeurIPS 2024): stacking, clients merge the sum into the base"
    residual = True
    residual_modes = ("fold",)

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def accumulator(self, reference, shares=None, **kwargs):
        return FLoRAAccumulator(self, reference, shares, **kwargs)


class FLoRAAccumulator(Accumulator):
    def result(self, rank: int) -> RuleResult:
        target = self.sum.matrices() if self.sum.dense else self.sum.stacked()
        d_out, d_in = self.reference.u.shape[0], self.reference.v.shape[0]
        # A fresh LoRA init, reproducible: seeded by the rule and the accumulator's seed
        # (the strategy passes one per round and layer).
        gen = torch.Generator().manual_seed(self.rule.seed * 1_000_003 + self.seed)
        bound = d_in ** -0.5
        fresh = Factors(
            torch.zeros(d_out, rank, dtype=torch.float64),
            torch.ones(1, rank, dtype=torch.float64),
            (torch.rand(d_in, rank, generator=gen, dtype=torch.float64) * 2 - 1) * bound,
        )
        _, norm = self.sum.distance(fresh)
        return RuleResult(fresh, False, norm, norm, residual=target)
