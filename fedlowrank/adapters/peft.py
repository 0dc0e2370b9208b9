"""PEFT LoRA models as fedlowrank adapters: read ``(B, A, scaling)``, write an aggregate back.

A PEFT LoRA layer adds ``dW = scaling * B A`` (``B`` d_out x r, ``A`` r x d_in; a conv's
``A`` is a rank-r conv kernel and ``B`` a 1x1 conv, the same matrices once flattened).
That is a G = 1 adapter: in the wire convention of :mod:`fedlowrank.adapters.state`,
``U = sqrt(scaling) B``, ``S = 1``, ``V = sqrt(scaling) A^T``, so ``U diag(S) V^T`` is
PEFT's own ``get_delta_weight`` whatever ``r``, ``lora_alpha``, ``rank_pattern``,
``alpha_pattern``, rsLoRA or ``fan_in_fan_out`` say (they only change ``scaling`` or the
base weight's layout, not ``dW`` as a map from inputs to outputs).

Writing back fits the aggregate to each layer's own rank (the best rank-r
approximation, balanced as ``u sqrt(s)``, ``v sqrt(s)``), divides the scaling out and
loads it with PEFT's ``set_peft_model_state_dict``; :func:`save_peft_adapter` then
writes a PEFT adapter directory (``save_pretrained``) that ``PeftModel.from_pretrained``
loads. What PEFT holds that is not a plain LoRA (DoRA magnitudes, LoRA biases,
embedding LoRA, several active adapters) is refused, not approximated.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..aggregation.ranks import fit_rank

FACTORS = ("lora_U", "lora_S", "lora_V")


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` contains PEFT LoRA layers."""
    return any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.tuners.lora") and hasattr(module, "lora_A") and hasattr(module, "scaling")


def _adapter_name(model: nn.Module, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    active = getattr(model, "active_adapters", None) or ["default"]
    if len(active) != 1:
        raise ValueError(f"the PEFT model has {len(active)} active adapters {active}; name the one to exchange")
    return active[0]


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Module]:
    """PEFT LoRA layers of ``model`` by module name, checked to be plain LoRA.

    Raises
    ------
    ValueError
        If a layer uses what a (U, S, V) adapter cannot hold exactly: DoRA, a LoRA
        bias, embedding LoRA, a grouped convolution.
    """
    name_ = _adapter_name(model, adapter_name)
    layers = {}
    for name, module in model.named_modules():
        if not _is_lora_layer(module) or name_ not in module.lora_A:
            continue
        problems = []
        if getattr(module, "use_dora", {}).get(name_, False):
            problems.append("DoRA (a magnitude vector rescales W0 + dW)")
        if getattr(module, "lora_bias", {}).get(name_, False):
            problems.append("lora_bias")
        if getattr(module.get_base_layer(), "groups", 1) != 1:
            problems.append("a grouped convolution")
        if not isinstance(module.lora_A[name_], (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            problems.append(f"lora_A of type {type(module.lora_A[name_]).__name__}")
        if problems:
            raise ValueError(f"PEFT layer {name} uses {', '.join(problems)}: fedlowrank aggregates plain LoRA only")
        layers[name] = module
    if not layers:
        raise ValueError(f"no PEFT LoRA layer with adapter {name_!r} in the model")
    return layers


def _matrices(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B (d_out x r), A (r x d_in), scaling)`` of one layer, kernels flattened."""
    a = layer.lora_A[adapter].weight.detach()
    b = layer.lora_B[adapter].weight.detach()
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), float(layer.scaling[adapter])


def _is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def exchange_state(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """A PEFT model's adapters in the wire convention, plus its other trainable tensors.

    Keys are ``<module>.lora_U/S/V`` with PEFT's module names (``base_model.model...``);
    ``modules_to_save`` and any other trainable parameter travel under their own names.
    """
    adapter = _adapter_name(model, adapter_name)
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model, adapter).items():
        b, a, scaling = _matrices(layer, adapter)
        root = math.sqrt(scaling)
        state[f"{name}.lora_U"] = b * root
        state[f"{name}.lora_S"] = torch.ones(1, b.shape[1], dtype=b.dtype, device=b.device)
        state[f"{name}.lora_V"] = a.T * root
    for name, param in model.named_parameters():
        if param.requires_grad and not _is_lora_param(name):
            state[name] = param.detach().clone()
    return state


def exchange_keys(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Names of the tensors :func:`exchange_state` returns, without copying any."""
    factors = [f"{name}.{leaf}" for name in lora_layers(model, adapter_name) for leaf in FACTORS]
    return factors + [n for n, p in model.named_parameters() if p.requires_grad and not _is_lora_param(n)]


def peft_state_dict(
    model: nn.Module, state: dict, adapter_name: str | None = None, truncation: str = "svd"
) -> dict[str, torch.Tensor]:
    """``state`` (wire convention) as PEFT's own adapter state dict for ``model``.

    Keys and layout are those of ``peft.get_peft_model_state_dict``; each layer's factors
    are fitted to its PEFT rank (``truncation`` as in
    :func:`fedlowrank.adapters.state.fit_rank`: the best approximation, or the first
    columns for rules that freeze a factor). Above the received rank, ``B`` gets zero columns and
    ``A`` keeps the model's rows (LoRA's own fresh start for the extra columns).

    Raises
    ------
    KeyError
        If a layer's factors are missing.
    ValueError
        If factors do not fit a layer, carry more than one group, or come with fold
        factors (a PEFT base has nowhere to hold them).
    """

    adapter = _adapter_name(model, adapter_name)
    folds = sorted(k for k in state if k.rpartition(".")[2] in ("fold_U", "fold_V"))
    if folds:
        raise ValueError(f"fold factors {folds[:3]} cannot load into a PEFT model: use residual 'drop' or 'carry'")
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model, adapter).items():
        missing = [f"{name}.{leaf}" for leaf in FACTORS if f"{name}.{leaf}" not in state]
        if missing:
            raise KeyError(f"state is missing tensors: {missing}")
        u, s, v = (torch.as_tensor(state[f"{name}.{leaf}"]).detach().cpu().double() for leaf in FACTORS)
        s = s.reshape(1, -1) if s.dim() == 1 else s
        b_now, a_now, scaling = _matrices(layer, adapter)
        if s.shape[0] != 1:
            raise ValueError(f"{name}: S has {s.shape[0]} group rows; a PEFT LoRA layer holds one (FairLoRA needs fedlowrank adapters)")
        if u.shape[0] != b_now.shape[0] or v.shape[0] != a_now.shape[1] or not u.shape[1] == s.shape[1] == v.shape[1]:
            raise ValueError(
                f"{name}: factors U {tuple(u.shape)} S {tuple(s.shape)} V {tuple(v.shape)} do not fit a "
                f"{a_now.shape[1]}->{b_now.shape[0]} PEFT layer"
            )
        rank = b_now.shape[1]
        u, s, v = fit_rank(u, s, v, rank, truncation)
        # The balanced head has S = 1 except when it came through untouched (rank <= r):
        # put S into both sides evenly so that B A = U diag(S) V^T exactly.
        root_s = s[0].abs().sqrt()
        u, v = u * root_s, v * (s[0].sign() * root_s)
        root = math.sqrt(scaling)
        b = torch.zeros(b_now.shape, dtype=torch.float64)
        b[:, : u.shape[1]] = u / root
        a = a_now.double().clone()
        a[: v.shape[1]] = v.T / root
        a_param, b_param = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        out[f"{name}.lora_A.weight"] = a.reshape(a_param.shape).to(a_param.dtype)
        out[f"{name}.lora_B.weight"] = b.reshape(b_param.shape).to(b_param.dtype)
    return out


@torch.no_grad()
def load_exchange_state(model: nn.Module, state: dict, adapter_name: str | None = None, truncation: str = "svd") -> None:
    """Load a wire-convention state into a PEFT model (PEFT's loader for the LoRA part).

    The LoRA factors go through ``set_peft_model_state_dict``; other trainable tensors
    (``modules_to_save``, heads) are copied by name. Errors as :func:`peft_state_dict`.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = _adapter_name(model, adapter_name)
    expected = exchange_keys(model, adapter)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(f"state is missing tensors: {missing}")
    lora = peft_state_dict(model, state, adapter, truncation)
    # PEFT's loader wants its whole saved format (modules_to_save included, keys without
    # the adapter name): start from the model's own and replace the LoRA factors.
    saved = get_peft_model_state_dict(model, adapter_name=adapter)
    unknown = sorted(set(lora) - set(saved))
    if unknown:
        raise ValueError(f"PEFT's state dict has no {unknown[:5]}")
    result = set_peft_model_state_dict(model, {**saved, **lora}, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"PEFT did not take {unexpected[:5]}")
    params = dict(model.named_parameters())
    for name in expected:
        if name.rpartition(".")[2] in FACTORS:
            continue
        value = torch.as_tensor(state[name])
        if value.shape != params[name].shape:
            raise ValueError(f"{name}: got shape {tuple(value.shape)}, model has {tuple(params[name].shape)}")
        params[name].copy_(value.to(params[name].dtype))


def freeze_factor(model: nn.Module, leaf: str, adapter_name: str | None = None) -> None:
    """Stop training one factor in every PEFT layer: ``lora_V`` is PEFT's ``A``, ``lora_U`` its ``B``.

    ``lora_S`` does not exist in PEFT (it is 1), so freezing it is a no-op.
    """
    adapter = _adapter_name(model, adapter_name)
    peft_name = {"lora_V": "lora_A", "lora_U": "lora_B", "lora_S": None}[leaf]
    if peft_name is None:
        return
    for layer in lora_layers(model, adapter).values():
        getattr(layer, peft_name)[adapter].weight.requires_grad_(False)


def save_peft_adapter(model: nn.Module, state: dict, directory: str | Path, adapter_name: str | None = None) -> Path:
    """Load ``state`` (e.g. the final global arrays) into ``model`` and write a PEFT adapter directory.

    The directory holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``;
    ``PeftModel.from_pretrained(base, directory)`` gives the aggregate back.
    """
    load_exchange_state(model, state, adapter_name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), selected_adapters=[_adapter_name(model, adapter_name)], safe_serialization=True)
    return directory
