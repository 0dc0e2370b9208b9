"""Rules that average factors entry by entry: ``fedit``, ``fairfedmed``, ``ffa`` and ``zero-pad``.

They keep running weighted sums of the factors themselves (one client in memory at a
time); their error against the exact weighted sum of products is measured on the same
footing as any rule's (:class:`~.base.Accumulator` keeps that sum).
"""

from __future__ import annotations

import torch

from ..ranks import Factors
from .base import Accumulator, AggregationRule, RuleResult, register_rule


class _FactorMeans(Accumulator):
    """Running weighted sums of ``U``, ``S`` (per group, by ``product_weights``) and ``V``."""

    def __init__(self, rule, reference, shares=None, **kwargs):
        super().__init__(rule, reference, shares, **kwargs)
        self.weight = 0.0
        self.u = torch.zeros_like(self.reference.u)
        self.v = torch.zeros_like(self.reference.v)
        self.s = torch.zeros_like(self.reference.s)  # rows weighted by product_weights
        self.s_pooled = torch.zeros_like(self.reference.s)  # rows weighted by the sample weight
        self.s_weight = torch.zeros(self.groups, dtype=torch.float64)

    def collect(self, client, weight, product_weights):
        self.weight += weight
        self.u += weight * client.u
        self.v += weight * client.v
        self.s += product_weights[:, None] * client.s
        self.s_pooled += weight * client.s
        self.s_weight += product_weights

    def means(self) -> Factors:
        total = self.weight if self.weight > 0 else 1.0
        u, v, pooled = self.u / total, self.v / total, self.s_pooled / total
        s = torch.where(self.s_weight[:, None] > 0, self.s / self.s_weight.clamp_min(1e-300)[:, None], pooled)
        return Factors(u, s, v)

    def measured(self, factors: Factors, floor=None) -> RuleResult:
        error, target = self.sum.distance(factors)
        return RuleResult(factors, False, error, target, floor)


@register_rule("fedit")
class FedITRule(AggregationRule):
    """Average ``U``, ``S`` and ``V`` separately by sample share (FedAvg on the factors).

    Not the average of the products; kept as the baseline. Needs equal ranks.
    """

    sums_products = False

    source = "FedIT (Zhang et al., ICASSP 2024): FedAvg of the LoRA factors"
    mixed_ranks = False

    def accumulator(self, reference, shares=None, **kwargs):
        return FedITAccumulator(self, reference, shares, **kwargs)


class FedITAccumulator(_FactorMeans):
    def result(self, rank: int) -> RuleResult:
        return self.measured(self.means())


@register_rule("fairfedmed")
class FairFedMedRule(AggregationRule):
    """FairFedMed's rule: ``U, V`` by sample share, each ``S`` row by its group's share.

    Parameters
    ----------
    shared_fraction : float in [0, 1] (default: 0)
        The first ``floor(shared_fraction * r)`` columns of ``S`` are shared between groups
        (averaged by sample share, like ``U, V``).
    server_momentum : float in [0, 1) (default: 0)
        The result is ``m * previous + (1 - m) * average``.
    """

    sums_products = False

    source = "FairFedMed (Li et al., 2025): FairLoRA with group-wise singular values"
    grouped = True
    mixed_ranks = False

    def __init__(self, shared_fraction: float = 0.0, server_momentum: float = 0.0) -> None:
        if not 0.0 <= shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction {shared_fraction} must be in [0, 1]")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum {server_momentum} must be in [0, 1)")
        self.shared_fraction = shared_fraction
        self.server_momentum = server_momentum

    def accumulator(self, reference, shares=None, **kwargs):
        return FairFedMedAccumulator(self, reference, shares, **kwargs)


class FairFedMedAccumulator(_FactorMeans):
    def result(self, rank: int) -> RuleResult:
        u, s, v = self.means()
        shared = int(self.rule.shared_fraction * s.shape[1])
        if shared:
            total = self.weight if self.weight > 0 else 1.0
            s = s.clone()
            s[:, :shared] = self.s_pooled[:, :shared] / total
        m = self.rule.server_momentum
        if m > 0:
            u, s, v = (m * p + (1 - m) * x for p, x in zip(self.reference, (u, s, v)))
        return self.measured(Factors(u, s, v))


@register_rule("ffa")
class FFARule(AggregationRule):
    """FFA-LoRA: ``V`` (LoRA's ``A``) frozen at the global one, only ``U diag(S)`` trained.

    With ``V`` shared the mean of the products is the product of the means, so the
    average is exact: ``(sum_k p_k U_k diag(S_k)) V^T``. A reply whose ``V`` differs from
    the global one is dropped. Clients are told to freeze ``lora_V`` (``frozen``); a
    client of rank ``r`` keeps the first ``r`` columns.
    """

    sums_products = False

    source = "FFA-LoRA (Sun et al., ICLR 2024): freeze A, average B"
    truncation = "columns"
    frozen = ("lora_V",)
    tolerance = 1e-5

    def check(self, client, reference):
        super().check(client, reference)
        expected = reference.v[:, : client.rank].double()
        gap = float((client.v.double() - expected).norm())
        if gap > self.tolerance * max(float(expected.norm()), 1e-30):
            raise ValueError(
                f"lora_V moved by {gap:.3g} (relative {gap / max(float(expected.norm()), 1e-30):.3g}); "
                "rule 'ffa' needs V frozen at the global one"
            )
        if client.s.shape[0] != 1:
            raise ValueError("rule 'ffa' aggregates G = 1 adapters")

    def accumulator(self, reference, shares=None, **kwargs):
        return FFAAccumulator(self, reference, shares, **kwargs)


class FFAAccumulator(Accumulator):
    def __init__(self, rule, reference, shares=None, **kwargs):
        super().__init__(rule, reference, shares, **kwargs)
        self.b = torch.zeros_like(self.reference.u)
        self.weight = 0.0

    def collect(self, client, weight, product_weights):
        r = client.rank
        self.b[:, :r] += weight * client.u * client.s[0]
        tail = self.reference.columns(slice(r, None))
        self.b[:, r:] += weight * tail.u * tail.s[0]
        self.weight += weight

    def result(self, rank: int) -> RuleResult:
        b = self.b / (self.weight if self.weight > 0 else 1.0)
        factors = Factors(b, torch.ones(1, b.shape[1], dtype=b.dtype), self.reference.v)
        error, target = self.sum.distance(factors)
        return RuleResult(factors, False, error, target)


@register_rule("zero-pad")
class ZeroPadRule(AggregationRule):
    """HetLoRA-style mixed ranks: zero-pad each client's factors to the global rank, then average.

    A client of rank ``r_k`` holds the first ``r_k`` columns of the global adapter and its
    factors are padded with zero columns (``S`` with ones, which the zero columns ignore)
    before ``U``, ``S`` and ``V`` are averaged entry by entry. The baseline the exact rule
    is compared with on heterogeneous ranks; at equal ranks it is FedIT.
    """

    sums_products = False

    source = "HetLoRA (Cho et al., 2024) / HeteroLoRA: zero-padded factors averaged entry by entry"
    truncation = "columns"

    def accumulator(self, reference, shares=None, **kwargs):
        return ZeroPadAccumulator(self, reference, shares, **kwargs)


class ZeroPadAccumulator(_FactorMeans):
    def collect(self, client, weight, product_weights):
        missing = self.reference.rank - client.rank
        if missing:
            u, s, v = client
            client = Factors(
                torch.cat([u, u.new_zeros(u.shape[0], missing)], 1),
                torch.cat([s, s.new_ones(s.shape[0], missing)], 1),
                torch.cat([v, v.new_zeros(v.shape[0], missing)], 1),
            )
        super().collect(client, weight, product_weights)

    def result(self, rank: int) -> RuleResult:
        return self.measured(self.means())
