"""The global adapter (factors, fold, trained heads) as a file: safetensors, never pickle."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from .state import load_exchange_state


def save_adapter(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, object] | None = None) -> Path:
    """Write exchanged arrays (what :func:`exchange_state` gives, plus any fold) to ``path``.

    Written to a temporary file and renamed into place; ``metadata`` (JSON-able) goes into
    the safetensors header, e.g. the run configuration that produced it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    header = {"fedlowrank": json.dumps(dict(metadata or {}))}
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, object]:
    """Load a saved adapter into ``model`` (adapters injected as when it was trained).

    Returns the metadata stored with it (the rank, groups and run configuration the apps save).

    Raises
    ------
    ValueError
        If ``model`` has no adapters: inject them first, with the targets and rank it was
        trained with (``inject_adapters(model, targets, rank=meta["rank"], ...)``).
    """
    from safetensors import safe_open

    from .inject import adapter_layers

    with safe_open(str(path), framework="numpy") as handle:
        meta = json.loads((handle.metadata() or {}).get("fedlowrank", "{}"))
    if not adapter_layers(model):
        rank = f"rank={meta['rank']}" if "rank" in meta else "its rank"
        raise ValueError(f"the model has no adapters to load {Path(path).name} into: inject them first as when it was "
                         f"trained, e.g. inject_adapters(model, <the app's ADAPTER_TARGETS>, {rank}, trainable=<TRAINABLE>)")
    arrays = load_file(str(path))
    load_exchange_state(model, {k: torch.from_numpy(v) for k, v in arrays.items()})
    return meta
