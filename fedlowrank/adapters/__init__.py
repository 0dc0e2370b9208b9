"""SVD-factored adapters: one layer type per file, injection into any model, and state I/O.

Importing this package registers the adapters for ``nn.Linear`` (:mod:`.linear`),
``nn.Conv1d/2d/3d`` (:mod:`.conv`) and GPT-2's ``Conv1D`` (:mod:`.gpt2_conv1d`).
PEFT LoRA models are read and written by :mod:`.peft`.
"""

from .base import UNKNOWN_GROUP, SVDAdapter, adaptable_types, adapter_class_for, register_adapter
from .conv import SVDConv
from .files import load_adapter, save_adapter
from .gpt2_conv1d import SVDConv1D
from .groups import group_context, group_weights_from_ids
from .inject import adapter_layers, inject_adapters
from .linear import SVDLinear
from .state import FACTOR_SUFFIXES, FOLD_SUFFIXES, exchange_state, is_fold_key, load_exchange_state, split_factor_key

__all__ = [
    "FACTOR_SUFFIXES",
    "FOLD_SUFFIXES",
    "UNKNOWN_GROUP",
    "SVDAdapter",
    "SVDConv",
    "SVDConv1D",
    "SVDLinear",
    "adaptable_types",
    "adapter_class_for",
    "adapter_layers",
    "exchange_state",
    "group_context",
    "group_weights_from_ids",
    "inject_adapters",
    "is_fold_key",
    "load_adapter",
    "load_exchange_state",
    "register_adapter",
    "save_adapter",
    "split_factor_key",
]
