"""Read and load what a client exchanges: adapter factors and other trainable tensors.

Wire convention (both directions): for each adapted module ``m`` the tensors
``m.lora_U`` (d_out x r), ``m.lora_S`` (G x r) and ``m.lora_V`` (d_in x r) satisfy
``dW_g = U diag(S[g]) V^T`` exactly: the layer's ``scale`` is folded in, split evenly
between ``U`` and ``V`` so that ``S`` keeps the magnitude the optimiser saw. Each
client may use its own rank and scale; loading fits the factors to the local rank.
All other trainable parameters (heads, norms) travel under their own names.

A PEFT LoRA model exchanges the same way: these functions hand it to
:mod:`fedlowrank.adapters.peft`, which reads and writes its ``(B, A, scaling)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import peft as peft_interop
from ..aggregation.ranks import factor_ranks, fit_arrays_to_ranks, fit_rank  # noqa: F401  (re-exported)
from ..wire import FACTOR_SUFFIXES, FOLD_SUFFIXES, is_fold_key, split_factor_key  # noqa: F401  (re-exported)
from .inject import adapter_layers

def exchange_keys(model: nn.Module) -> list[str]:
    """Names of the tensors :func:`exchange_state` returns, without copying any."""
    if peft_interop.is_peft_model(model):
        return peft_interop.exchange_keys(model)
    layers = adapter_layers(model)
    factors = [f"{name}.{leaf}" for name in layers for leaf in FACTOR_SUFFIXES]
    taken = set(factors)
    return factors + [n for n, p in model.named_parameters() if p.requires_grad and n not in taken]


def exchange_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a client sends: factors with scale folded in, plus trainable tensors."""
    if peft_interop.is_peft_model(model):
        return peft_interop.exchange_state(model)
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


def _pad(tensor: torch.Tensor, rank: int, fill: torch.Tensor) -> torch.Tensor:
    """Pad ``tensor``'s columns up to ``rank`` from ``fill``."""
    if tensor.shape[1] >= rank:
        return tensor
    return torch.cat([tensor, fill[:, tensor.shape[1] : rank]], dim=1)


@torch.no_grad()
def load_exchange_state(model: nn.Module, state: dict[str, torch.Tensor], truncation: str = "svd") -> None:
    """Load a state in the wire convention into ``model``.

    Fold factors (``m.fold_U``, ``m.fold_V``), when present, replace the layer's base
    correction; when absent it is cleared. Factors of a different rank are fitted to the
    layer's rank: a global adapter of
    higher rank is loaded as its best approximation at the layer's rank (:func:`fit_rank`;
    ``truncation="columns"`` keeps the first columns instead, for rules that freeze a
    factor); one of lower rank is padded with freshly initialised adapter columns
    (``U = 0``, ``V`` kept, ``S = 1``). Grouped adapters order their columns by the
    layer's ``group_share`` (set it first, as the server's shares).

    Raises
    ------
    KeyError
        If ``state`` lacks a tensor the model exchanges.
    ValueError
        If a tensor's shape does not fit the model.
    """
    if peft_interop.is_peft_model(model):
        peft_interop.load_exchange_state(model, state, truncation=truncation)
        return
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
        if not (u.shape[1] == s.shape[1] == v.shape[1]):
            raise ValueError(f"{name}: factors disagree on rank: U {u.shape[1]}, S {s.shape[1]}, V {v.shape[1]}")
        shares = layer.group_share.detach().cpu().double() if layer.groups > 1 else None
        u, s, v = fit_rank(u, s, v, layer.rank, truncation, shares)
        root = math.sqrt(layer.scale)
        dtype = layer.lora_U.dtype
        layer.lora_U.copy_(_pad(u.to(dtype) / root, layer.rank, torch.zeros_like(layer.lora_U)))
        layer.lora_V.copy_(_pad(v.to(dtype) / root, layer.rank, layer.lora_V))
        layer.lora_S.copy_(_pad(s.to(dtype), layer.rank, torch.ones_like(layer.lora_S)))
        fold_u, fold_v = state.get(f"{name}.fold_U"), state.get(f"{name}.fold_V")
        if (fold_u is None) != (fold_v is None):
            raise ValueError(f"{name}: got only one of fold_U / fold_V")
        if fold_u is None:
            layer.set_fold(layer.fold_U[:, :0], layer.fold_V[:, :0])
        else:
            layer.set_fold(torch.as_tensor(fold_u), torch.as_tensor(fold_v))
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
