"""Put SVD-factored adapters into any ``nn.Module`` by module-name pattern.

The adapter for each matched module comes from its type (:func:`register_adapter`):
``nn.Linear``, ``nn.Conv1d/2d/3d`` and GPT-2's ``Conv1D`` today.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .base import SVDAdapter, adaptable_types, adapter_class_for


def _is_peft_lora(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.tuners.lora") for m in model.modules())


def _unsupported(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot take an adapter, or None if it can."""
    if adapter_class_for(module) is None:
        return f"{type(module).__module__}.{type(module).__qualname__} has no adapter type (adaptable: {adaptable_types()})"
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling the
        # module, so a wrapper would be silently bypassed.
        return "nn.MultiheadAttention uses out_proj's weight without calling it, so an adapter there would never run"
    return None


def inject_adapters(
    model: nn.Module,
    target_modules: str | Iterable[str],
    rank: int,
    groups: int = 1,
    alpha: float | None = None,
    trainable: str | Iterable[str] = (),
) -> list[str]:
    """Wrap matching layers with the adapter for their type and freeze the rest.

    Parameters
    ----------
    model : nn.Module
        Model to adapt in place.
    target_modules : str or iterable of str
        Regular expressions matched (``re.fullmatch``) against module names, e.g.
        ``"encoder\\..*\\.(q|v)_proj"`` or ``"layer[34]\\..*conv[12]"``; a name matches
        if any pattern matches.
    rank, groups, alpha
        Passed to the adapter (:class:`~fedlowrank.adapters.base.SVDAdapter`).
    trainable : str or iterable of str
        Patterns of parameter names that stay trainable in full (a task head, norms).

    Returns
    -------
    list of str
        Names of the adapted modules, in model order.

    Raises
    ------
    ValueError
        If nothing matches, if a matched module's type takes no adapter (the error
        names the module and its type), or if ``model`` is a PEFT LoRA model (its LoRA
        layers already are the adapters: see :mod:`fedlowrank.adapters.peft`).
    """
    if _is_peft_lora(model):
        raise ValueError(
            "this is a PEFT LoRA model: its LoRA layers already are the adapters, and wrapping them "
            "again would train adapters of adapters. Use it as it is: fedlowrank reads and writes "
            "its (B, A, scaling) through fedlowrank.adapters.peft (exchange_state does this for you)"
        )
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    keep = [trainable] if isinstance(trainable, str) else list(trainable)
    matched = [
        (name, module)
        for name, module in model.named_modules()
        if name and not isinstance(module, SVDAdapter) and any(re.fullmatch(p, name) for p in targets)
    ]
    # A pattern may match a container (a block) or a parameterless leaf (an activation)
    # as well as the layers meant: only layers with weights of their own that take no
    # adapter are errors.
    problems = []
    names = []
    for name, module in matched:
        reason = _unsupported(model, name, module)
        if reason is None:
            names.append(name)
        elif adapter_class_for(module) is not None or any(True for _ in module.parameters(recurse=False)):
            problems.append(f"{name} ({type(module).__name__}): {reason}")
    if problems:
        raise ValueError("cannot put an adapter on: " + "; ".join(problems))
    if not names:
        adaptable = [n for n, m in model.named_modules() if n and adapter_class_for(m) is not None]
        raise ValueError(f"no adaptable module matches {targets}; adaptable modules are: {adaptable[:50]}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, adapter_class_for(base)(base, rank, groups, alpha))
    for name, param in model.named_parameters():
        if any(re.fullmatch(p, name) for p in keep):
            param.requires_grad_(True)
    return names


def adapter_layers(model: nn.Module) -> dict[str, SVDAdapter]:
    """The adapter layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDAdapter)}
