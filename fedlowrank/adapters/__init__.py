"""SVD-factored adapters: the layer, injection into any model, and state I/O."""

from .files import load_adapter, save_adapter
from .groups import group_context, group_weights_from_ids
from .inject import adapter_layers, inject_adapters
from .layer import UNKNOWN_GROUP, SVDLinear
from .state import FACTOR_SUFFIXES, FOLD_SUFFIXES, exchange_state, is_fold_key, load_exchange_state, split_factor_key

__all__ = [
    "FACTOR_SUFFIXES",
    "FOLD_SUFFIXES",
    "UNKNOWN_GROUP",
    "SVDLinear",
    "adapter_layers",
    "exchange_state",
    "group_context",
    "group_weights_from_ids",
    "inject_adapters",
    "is_fold_key",
    "load_adapter",
    "load_exchange_state",
    "save_adapter",
    "split_factor_key",
]
