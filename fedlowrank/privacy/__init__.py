"""Adapter-only DP-SGD with Opacus: per-sample gradients of the adapters, setup, accounting.

Importing this package registers the adapters' grad samplers with Opacus. Opacus
is needed here only; the rest of fedlowrank does not import it.
"""

from .accounting import (
    ACCOUNTANTS,
    STATE_KEYS,
    BudgetCheck,
    calibrate_noise,
    check_budget,
    epsilon_spent,
    export_accountant_state,
    load_accountant_state,
    round_plan,
)
from .engine import PrivateTraining, make_private, per_sample_norms
from .grad_sampler import (
    compute_svd_conv_grad_sample,
    compute_svd_linear_grad_sample,
    forward_group_weights,
    track_group_weights,
)
from .validation import validate_model, wrap_model

__all__ = [
    "ACCOUNTANTS",
    "STATE_KEYS",
    "BudgetCheck",
    "PrivateTraining",
    "calibrate_noise",
    "check_budget",
    "compute_svd_conv_grad_sample",
    "compute_svd_linear_grad_sample",
    "epsilon_spent",
    "export_accountant_state",
    "forward_group_weights",
    "load_accountant_state",
    "make_private",
    "per_sample_norms",
    "round_plan",
    "track_group_weights",
    "validate_model",
    "wrap_model",
]
