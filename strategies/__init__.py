"""Flower server side: strategies that aggregate low-rank adapters."""

from .catalog import make_strategy, strategy_names
from .fairlora import FairLoRA
from .federated_fairness import FederatedFairnessMetrics
from .fedlowrank import FedLowRank
from .initial import initial_arrays
from .lgreco import LGreCo
from .secure import SecureLowRank

__all__ = ["FairLoRA", "FederatedFairnessMetrics", "FedLowRank", "LGreCo", "SecureLowRank", "initial_arrays", "make_strategy",
           "strategy_names"]
