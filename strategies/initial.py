"""The global arrays a run starts from, read from the model users already have."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from torch import nn

from fedlowrank.adapters import exchange_state


def initial_arrays(model: nn.Module) -> ArrayRecord:
    """``strategy.start(..., initial_arrays=initial_arrays(model))`` for any adapted model.

    ``model`` has fedlowrank adapters (:func:`fedlowrank.adapters.inject_adapters`) or is
    a PEFT LoRA model (``get_peft_model``): either way the record holds exact factors
    (``<module>.lora_U/S/V``, scale folded in) and the other trainable tensors, never
    PEFT's raw ``lora_A``/``lora_B``, which no strategy may average factor by factor.
    """
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().float().numpy())) for k, v in exchange_state(model).items()})
