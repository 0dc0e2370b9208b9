"""Strategies by name: one table, built from the rules' own declarations.

Every registered rule is a strategy name (a grouped rule gives ``FairLoRA``, any other
``FedLowRank``), plus a few names people know the methods by. The apps' run config and the
experiment runner both read it, so a new rule is a new strategy everywhere at once.
"""

from __future__ import annotations

from typing import Any

from fedlowrank.aggregation.rules import get_rule, registered_rules

from .fairlora import FairLoRA
from .fedlowrank import FedLowRank

ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "fedlowrank": ("exact", {}),
    "fedex": ("exact", {"residual": "fold"}),  # FedEx-LoRA: what the rank cannot hold goes into the base
    "fairlora-paper": ("fairfedmed", {}),
}
"""Name -> (rule, strategy options)."""


def strategy_names() -> list[str]:
    """Every name :func:`make_strategy` takes, sorted."""
    return sorted({*registered_rules(), *ALIASES})


def rule_of(name: str):
    """The aggregation rule strategy ``name`` uses (its declarations: ``grouped``, ``mixed_ranks``)."""
    return get_rule(ALIASES.get(name, (name, {}))[0])


def is_grouped(name: str) -> bool:
    """Whether strategy ``name`` aggregates grouped adapters (one row of ``S`` per group)."""
    return rule_of(name).grouped


def make_strategy(name: str, rank: int | None = None, **options: Any) -> FedLowRank:
    """The strategy called ``name`` at global ``rank``; ``options`` go to its constructor.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    if name not in ALIASES and name not in registered_rules():
        raise ValueError(f"unknown strategy {name!r}; choose one of {strategy_names()}")
    rule, preset = ALIASES.get(name, (name, {}))
    options = {**preset, **options}
    if is_grouped(rule):
        mode = {r: m for m, r in FairLoRA.RULES.items()}[rule]
        return FairLoRA(mode=mode, rank=rank, **options)
    return FedLowRank(rule=rule, rank=rank, **options)
