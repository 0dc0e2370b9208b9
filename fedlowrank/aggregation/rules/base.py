"""The aggregation-rule interface and registry.

A rule is a small class registered by name (as codecs are, :func:`register_rule`). For
each adapted layer and round the strategy asks it for an :class:`Accumulator`, folds the
accepted replies in one at a time (``acc.add(factors, weight, group_weights)``) and asks
for the result at the layer's global rank (``acc.result(rank)``): factors, per-group
errors against the rule's target, and, for exact rules, the residual the rank could not
hold (for the ``carry`` and ``fold`` residual modes).

Every accumulator keeps the exact weighted sum of the clients' products
(:class:`~fedlowrank.aggregation.accumulate.WeightedSum`, memory bounded by the layer), so
any rule's error is measured against the same target. A client of rank below the global
rank is completed with the global tail it could not hold (:mod:`..ranks`), so a round in
which nobody changes anything leaves the global adapter unchanged, at any mix of ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch

from ...registry import Registry
from ..accumulate import WeightedSum
from ..ranks import Factors, split_at_rank

_RULES = Registry("Rule", lambda name: name.replace("-", "").isalnum(), "letters, digits and '-' only")


def register_rule(name: str) -> Callable[[type["AggregationRule"]], type["AggregationRule"]]:
    """Register an :class:`AggregationRule` subclass under ``name`` (class decorator)."""
    return _RULES.register(name)


def registered_rules() -> list[str]:
    """Names of all registered rules, sorted."""
    return _RULES.names()


def get_rule(rule: "str | AggregationRule", **options: Any) -> "AggregationRule":
    """A rule by name (with its options), or ``rule`` itself if it is one already.

    Raises
    ------
    ValueError
        For an unknown name (listing the registered ones) or options the rule does not take.
    """
    if isinstance(rule, AggregationRule):
        if options:
            raise ValueError(f"options {sorted(options)} given with a rule instance {rule!r}")
        return rule
    if rule not in _RULES.classes:
        raise ValueError(f"unknown aggregation rule {rule!r}; registered rules: {registered_rules()}")
    try:
        return _RULES.classes[rule](**options)
    except TypeError as err:
        raise ValueError(f"rule {rule!r}: {err}") from None


class RuleResult(NamedTuple):
    """One layer's aggregate and how far it is from the rule's target."""

    factors: Factors
    """At the global rank; float64."""
    magnitude_in_s: bool
    """Whether ``u, v`` have unit-norm columns (orthonormal for G = 1) with the magnitude
    in ``s`` (the strategy then balances it for the clients), or are factors to hand
    back as they are (factor-averaging rules)."""
    error_norms: torch.Tensor
    """(G,) ``||M_g - result_g||`` against the exact weighted sum ``M_g``."""
    target_norms: torch.Tensor
    """(G,) ``||M_g||``."""
    floor_norms: torch.Tensor | None = None
    """(G,) the best separate rank-``r`` truncation's error per group (grouped rules)."""
    residual: Factors | torch.Tensor | None = None
    """``M - result`` as factors or a dense ``(G x d_out x d_in)`` tensor, exact rules only."""


class AggregationRule(ABC):
    """Base class: the properties the strategy needs and the accumulator factory.

    Class attributes
    ----------------
    source : str
        Where the rule comes from, one line (shown in the docs).
    grouped : bool
        Accepts ``S`` with several group rows.
    mixed_ranks : bool
        Can combine clients of different ranks (lower ranks completed by the global tail).
    truncation : {"svd", "columns"}
        How a client of lower rank holds the global adapter (:func:`split_at_rank`).
    frozen : tuple of str
        Factors clients must not train (FFA-LoRA freezes ``lora_V``).
    residual : bool
        Whether :meth:`Accumulator.result` returns the residual (``carry``/``fold``).
    residual_modes : tuple of str
        The strategy's residual modes this rule supports; the first is its default.
    sums_products : bool
        The result depends on the replies only through the weighted sum of their completed
        products, so a secure sum of products can give it (rules that average factors: no).
    """

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    grouped: ClassVar[bool] = False
    mixed_ranks: ClassVar[bool] = True
    truncation: ClassVar[str] = "svd"
    frozen: ClassVar[tuple[str, ...]] = ()
    residual: ClassVar[bool] = False
    residual_modes: ClassVar[tuple[str, ...]] = ("drop",)
    sums_products: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def check(self, client: Factors, reference: Factors) -> None:
        """Raise ``ValueError`` if this rule cannot take ``client`` (the reply is dropped)."""
        groups, rank = reference.s.shape[0], reference.rank
        if client.s.shape[0] != groups:
            raise ValueError(f"S has {client.s.shape[0]} group rows, the global adapter has {groups}")
        if client.rank > rank:
            raise ValueError(f"rank {client.rank} is above the global rank {rank}")
        if client.rank < rank and not self.mixed_ranks:
            raise ValueError(
                f"rank {client.rank} differs from the global rank {rank}; rule '{self.name}' averages "
                "factors entry by entry and cannot mix ranks (use 'exact')"
            )

    @abstractmethod
    def accumulator(self, reference: Factors, shares: torch.Tensor | None = None, **kwargs: Any) -> "Accumulator":
        """A fresh accumulator for one layer and round.

        Parameters
        ----------
        reference : Factors
            The global adapter this round's clients received.
        shares : tensor, optional
            Group shares sent this round (they order grouped columns for low-rank clients).
        **kwargs
            ``seed`` (for rules that draw, e.g. FLoRA's fresh init), the rest passed to
            :class:`~fedlowrank.aggregation.accumulate.WeightedSum` (``dense_above``, ``dtype``);
            ``tail_weight`` (default 1) scales the global tail that completes a lower-rank
            client's reply (``RoundConfig.tail_weight``).
        """


class Accumulator(ABC):
    """Folds clients in one at a time; subclasses add what their rule needs.

    Subclasses implement :meth:`collect` (optional) and :meth:`result`.
    """

    def __init__(self, rule: AggregationRule, reference: Factors, shares: torch.Tensor | None = None, **kwargs: Any) -> None:
        self.rule = rule
        self.reference = Factors(*(t.double() for t in reference))
        self.groups = self.reference.s.shape[0]
        self.shares = shares
        self.seed = int(kwargs.pop("seed", 0))
        # Share of the global tail a lower-rank client's reply is completed with (1: exact).
        self.tail_weight = float(kwargs.pop("tail_weight", 1.0))
        self.sum = WeightedSum(self.reference.u.shape[0], self.reference.v.shape[0], self.groups, **kwargs)

    @property
    def clients(self) -> int:
        return self.sum.clients

    def product_weights(self, weight: float, group_weights: torch.Tensor | None) -> torch.Tensor:
        """Each group's weight of this client's product: per-group counts if grouped."""
        if self.groups > 1 and group_weights is not None:
            return torch.as_tensor(group_weights, dtype=torch.float64)
        return torch.full((self.groups,), float(weight), dtype=torch.float64)

    def tail(self, rank: int) -> Factors:
        """The global adapter's components a client of ``rank`` could not hold."""
        return split_at_rank(self.reference, rank, self.rule.truncation, self.shares)[1]

    def add(
        self, client: Factors, weight: float, group_weights: torch.Tensor | None = None, shrink: float = 1.0
    ) -> None:
        """Fold in one checked client (``rule.check`` passed): its product and its tail.

        ``shrink`` < 1 scales the client's change by that factor (robust clipping): its
        completed product becomes ``G + shrink (P + T - G)``, and its factors
        ``reference + shrink (client - reference)`` for rules that average factors.
        """
        client = Factors(*(t.to(self.sum.dtype) for t in client))
        w = self.product_weights(weight, group_weights)
        self.sum.count(w)
        self.sum.add(client, shrink * w, count=False)
        if client.rank < self.reference.rank and self.tail_weight:
            self.sum.add(self.tail(client.rank), shrink * self.tail_weight * w, count=False)
        if shrink < 1.0:
            self.sum.add(self.reference, (1.0 - shrink) * w, count=False)
            head = self.reference.columns(slice(0, client.rank))
            client = Factors(*(h.to(self.sum.dtype) + shrink * (c - h.to(self.sum.dtype)) for h, c in zip(head, client)))
        self.collect(client, float(weight), w)

    def change_norm(self, client: Factors) -> float:
        """``||P + T - G||``: how far this client's completed product moves the global."""
        probe = WeightedSum(self.reference.u.shape[0], self.reference.v.shape[0], self.groups, dense_above=10**9)
        probe.add_normalised(Factors(*(t.double() for t in client)))
        if client.rank < self.reference.rank and self.tail_weight:
            tail = self.tail(client.rank)
            probe.add_normalised(Factors(tail.u, self.tail_weight * tail.s, tail.v))
        error, _ = probe.distance(self.reference)
        return float(error.square().sum().sqrt())

    def add_carried(self, residual: Factors | torch.Tensor) -> None:
        """Add last round's residual (``carry``) to this round's target."""
        self.sum.add_normalised(residual)

    def collect(self, client: Factors, weight: float, product_weights: torch.Tensor) -> None:
        """Hook for rules that keep more than the sum of products (e.g. factor averages)."""

    @abstractmethod
    def result(self, rank: int) -> RuleResult:
        """The layer's aggregate at global rank ``rank``."""
