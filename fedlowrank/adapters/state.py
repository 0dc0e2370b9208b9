"""Read and load what a client exchanges: adapter factors and other trainable tensors.

Wire convention (both directions): for each adapted module ``m`` the tensors
``m.lora_U`` (d_out x r), ``m.lora_S`` (G x r) and ``m.lora_V`` (d_in x r) satisfy
``dW_g = U diag(S[g]) V^T`` exactly: the layer's ``scale`` is folded in, split evenly
between ``U`` and ``V`` so that ``S`` keeps the magnitude the optimiser saw. Each
client may use its own rank and scale; loading fits the factors to the local rank.
All other trainable parameters (heads, norms) travel under their own names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .inject import adapter_layers

FACTOR_SUFFIXES = ("lora_U", "lora_S", "lora_V")


def split_factor_key(key: str) -> tuple[str, str] | None:
    """``"a.b.lora_U"`` -> ``("a.b", "lora_U")``; None for a non-factor key."""
    module, _, leaf = key.rpartition(".")
    return (module, leaf) if leaf in FACTOR_SUFFIXES else None


def exchange_keys(model: nn.Module) -> list[str]:
    """Names of the tensors :func:`exchange_state` returns, without copying any."""
    layers = adapter_layers(model)
    factors = [f"{name}.{leaf}" for name in layers for leaf in FACTOR_SUFFIXES]
    taken = set(factors)
    return factors + [n for n, p in model.named_parameters() if p.requires_grad and n not in taken]


def exchange_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a client sends: factors with scale folded in, plus trainable tensors."""
    state: dict[str, torch.Tensor] = {}
    factor_params = set()
    for name, layer in adapter_layers(model).items():
        root = math.sqrt(layer.scale)
        state[f"{name}.lora_U"] = layer.lora_U.detach() * root
        state[f"{name}.lora_S"] = layer.lora_S.detach().clone()
        state[f"{name}.lora_V"] = layer.lora_V.detach() * root
        factor_params.update(f"{name}.{s}" for s in FACTOR_SUFFIXES)
    for name, param in model.named_parameters():
        if param.requires_grad and name not in factor_params:
            state[name] = param.detach().clone()
    return state


def _fit_rank(tensor: torch.Tensor, rank: int, fill: torch.Tensor) -> torch.Tensor:
    """Keep the first ``rank`` columns of ``tensor``, padding from ``fill`` if short."""
    if tensor.shape[1] >= rank:
        return tensor[:, :rank]
    return torch.cat([tensor, fill[:, tensor.shape[1] : rank]], dim=1)


@torch.no_grad()
def load_exchange_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state in the wire convention into ``model``.

    Factors of a different rank are fitted to the layer's rank: extra components
    (which come sorted by magnitude from the strategy) are dropped; missing ones are
    filled as freshly initialised adapter columns (``U = 0``, ``V`` kept, ``S = 1``), so
    a client of higher rank than the global adapter still trains all its columns.

    Raises
    ------
    KeyError
        If ``state`` lacks a tensor the model exchanges.
    ValueError
        If a tensor's shape does not fit the model.
    """
    layers = adapter_layers(model)
    expected = exchange_keys(model)
    missing = set(expected) - set(state)
    if missing:
        raise KeyError(f"state is missing tensors: {sorted(missing)}")
    params = dict(model.named_parameters())
    for name, layer in layers.items():
        u, s, v = (torch.as_tensor(state[f"{name}.{x}"]) for x in FACTOR_SUFFIXES)
        if u.shape[0] != layer.out_features or v.shape[0] != layer.in_features:
            raise ValueError(
                f"{name}: factors U {tuple(u.shape)} / V {tuple(v.shape)} do not fit a "
                f"{layer.in_features}->{layer.out_features} layer"
            )
        if s.dim() == 1:
            s = s.unsqueeze(0)
        if s.shape[0] != layer.groups:
            raise ValueError(f"{name}: S has {s.shape[0]} rows, layer has {layer.groups} groups")
        root = math.sqrt(layer.scale)
        dtype = layer.lora_U.dtype
        layer.lora_U.copy_(_fit_rank(u.to(dtype) / root, layer.rank, torch.zeros_like(layer.lora_U)))
        layer.lora_V.copy_(_fit_rank(v.to(dtype) / root, layer.rank, layer.lora_V))
        layer.lora_S.copy_(_fit_rank(s.to(dtype), layer.rank, torch.ones_like(layer.lora_S)))
    for name in expected:
        factor = split_factor_key(name)
        if factor is not None and factor[0] in layers:
            continue
        value = torch.as_tensor(state[name])
        if value.shape != params[name].shape:
            raise ValueError(
                f"{name}: got shape {tuple(value.shape)}, model has {tuple(params[name].shape)}"
            )
        params[name].copy_(value.to(params[name].dtype))
