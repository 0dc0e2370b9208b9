"""Flower server side: strategies that aggregate low-rank adapters."""

from .catalog import make_strategy, strategy_names
from .fairlora import FairLoRA
from .federated_fairness import FederatedFairnessMetrics
from .fedlowrank import FedLowRank
from .initial import initial_arrays
from .lgreco import LGreCo

__all__ = ["FairLoRA", "FederatedFairnessMetrics", "FedLowRank", "LGreCo", "initial_arrays", "make_strategy", "strategy_names"]
