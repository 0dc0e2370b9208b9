"""Put SVD-factored adapters into any ``nn.Module`` by module-name pattern."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .layer import SVDLinear


def inject_adapters(
    model: nn.Module,
    target_modules: str | Iterable[str],
    rank: int,
    groups: int = 1,
    alpha: float | None = None,
    trainable: str | Iterable[str] = (),
) -> list[str]:
    """Wrap matching ``nn.Linear`` layers with :class:`SVDLinear` and freeze the base.

    Parameters
    ----------
    model : nn.Module
        Model to adapt in place.
    target_modules : str or iterable of str
        Regular expressions matched (``re.fullmatch``) against module names, e.g.
        ``"encoder\\..*\\.(q|v)_proj"``; a name matches if any pattern matches.
    rank, groups, alpha
        Passed to :class:`SVDLinear`.
    trainable : str or iterable of str
        Patterns of parameter names that stay trainable in full (a task head, norms).

    Returns
    -------
    list of str
        Names of the adapted modules, in model order.

    Raises
    ------
    ValueError
        If no ``nn.Linear`` matches the patterns.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    keep = [trainable] if isinstance(trainable, str) else list(trainable)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, SVDLinear)
        and any(re.fullmatch(p, name) for p in targets)
    ]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"no nn.Linear module matches {targets}; linear modules are: {linear}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SVDLinear(getattr(parent, child), rank, groups, alpha))
    for name, param in model.named_parameters():
        if any(re.fullmatch(p, name) for p in keep):
            param.requires_grad_(True)
    return names


def adapter_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """The adapter layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}
