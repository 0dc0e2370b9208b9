"""Aggregation rules, one registry (``register_rule`` / ``get_rule``), one file per family.

=================  ==========================================================================
rule               what it computes (source)
=================  ==========================================================================
``exact``          best rank-r approximation of the weighted sum, factored (FlexLoRA's target)
``flexlora-dense`` the same via the dense sum and a full SVD (FlexLoRA as published; reference)
``flora``          the exact sum stacked and folded into the base; fresh adapter each round (FLoRA)
``fedit``          FedAvg of U, S, V separately (FedIT); equal ranks only
``ffa``            V frozen and shared, mean of U diag(S): exact (FFA-LoRA)
``fairfedmed``     U, V by sample share, each S row by its group's share (FairFedMed)
``fairlora-exact`` shared u, v and per-group s fitted to each group's exact sum (CP-ALS)
=================  ==========================================================================
"""

from . import averaging, exact, grouped_exact  # noqa: F401  (registers the rules)
from .base import Accumulator, AggregationRule, RuleResult, get_rule, register_rule, registered_rules

__all__ = ["Accumulator", "AggregationRule", "RuleResult", "get_rule", "register_rule", "registered_rules"]
