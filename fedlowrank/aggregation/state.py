"""The cross-round state of a server round (and so of a FedLowRank-family strategy), in one serialisable object.

Like torch's ``PowerSGDState`` keeps a compressor's state in one place: the global arrays
sent last (replies are checked and completed against them, and the next aggregate is
aligned to them), the residual each layer carries into the next round (``carry``), the
group shares sent (FairLoRA) and the round number. The residual modes keep their per-layer
residual (``carry``) or fold (``fold``) here too. ``state_dict()`` gives plain numpy
arrays and JSON-able values, never pickled objects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .ranks import Factors

_META = "meta"


@dataclass
class LowRankState:
    """What a FedLowRank-family strategy remembers between rounds."""

    global_arrays: dict[str, np.ndarray] | None = None
    """The arrays sent in the last ``configure_train``."""
    residuals: dict[str, Factors | torch.Tensor] = field(default_factory=dict)
    """Per adapted module: what the global rank could not hold last round (``carry``), or
    the base correction folded so far (``fold``)."""
    momentum: dict[str, Factors | torch.Tensor] = field(default_factory=dict)
    """Per adapted module: the server's velocity ``v`` (``RoundConfig.momentum``), its exact
    non-zero triplets or, past the width where that is cheaper, a dense ``1 x d_out x d_in``."""
    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per adapted module: the adaptive server step's moments ``m`` and ``v`` stacked,
    ``2 x d_out x d_in`` (``RoundConfig.server_optimizer``)."""
    optimizer_steps: int = 0
    """Rounds the adaptive server step has taken (its bias correction)."""
    group_shares: list[float] | None = None
    """Group shares sent to clients (grouped adapters)."""
    server_round: int = 0
    median_weight: float | None = None
    """The median reply weight of the last round with 3 or more valid replies (``share_cap``
    falls back on it in a round with fewer)."""
    median_norm: float | None = None
    """The same round's median update norm (``robust`` falls back on it)."""
    step_scale: float = 1.0
    """The server step's decay so far (``RoundConfig.step_decay``)."""
    at_bound: dict[str, int] = field(default_factory=dict)
    """Per node (as a string): consecutive rounds its reply was capped, clipped or dropped."""

    def snapshot(self) -> dict:
        """What :meth:`restore` needs to undo a round that failed (the tables shallow-copied:
        a round replaces their entries, never changes them in place)."""
        return {name: dict(value) if isinstance(value, dict) else value for name, value in vars(self).items()}

    def restore(self, snapshot: dict) -> None:
        """Back to a :meth:`snapshot`."""
        for name, value in snapshot.items():
            setattr(self, name, dict(value) if isinstance(value, dict) else value)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``name -> np.ndarray``; metadata as a JSON string in a uint8 array."""
        out: dict[str, np.ndarray] = {}
        for key, value in (self.global_arrays or {}).items():
            out[f"global/{key}"] = np.array(value)
        for kind, table in (("residual", self.residuals), ("momentum", self.momentum), ("moments", self.moments)):
            for module, value in table.items():
                if isinstance(value, Factors):
                    for leaf, t in zip("usv", value):
                        out[f"{kind}/{module}/{leaf}"] = t.detach().cpu().numpy()
                else:
                    out[f"{kind}/{module}/dense"] = value.detach().cpu().numpy()
        meta = {
            "server_round": self.server_round,
            "group_shares": self.group_shares,
            "has_global": self.global_arrays is not None,
            "median_weight": self.median_weight,
            "median_norm": self.median_norm,
            "at_bound": self.at_bound,
            "step_scale": self.step_scale,
            "optimizer_steps": self.optimizer_steps,
        }
        out[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` wrote (replaces everything)."""
        meta = json.loads(bytes(np.asarray(state[_META], dtype=np.uint8)).decode())
        self.server_round = int(meta["server_round"])
        self.group_shares = meta["group_shares"]
        # Checkpoints written before these existed hold none; a malformed one is refused by name.
        self.median_weight = _positive_or_none(meta.get("median_weight"), "median_weight")
        self.median_norm = _positive_or_none(meta.get("median_norm"), "median_norm")
        at_bound = meta.get("at_bound", {})
        if not isinstance(at_bound, dict) or not all(isinstance(v, int) and v >= 0 for v in at_bound.values()):
            raise ValueError(f"state field at_bound is {at_bound!r}, not a table of round counts")
        self.at_bound = {str(k): v for k, v in at_bound.items()}
        step_scale = meta.get("step_scale", 1.0)
        if isinstance(step_scale, bool) or not isinstance(step_scale, (int, float)) or not 0.0 < step_scale <= 1.0:
            raise ValueError(f"state field step_scale is {step_scale!r}, not in (0, 1]")
        self.step_scale = float(step_scale)
        arrays = {k[len("global/"):]: np.array(v) for k, v in state.items() if k.startswith("global/")}
        self.global_arrays = arrays if meta["has_global"] else None
        self.residuals = _factor_table(state, "residual/")
        self.momentum = _factor_table(state, "momentum/")
        steps = meta.get("optimizer_steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state field optimizer_steps is {steps!r}, not a round count")
        self.optimizer_steps = steps
        moments = _factor_table(state, "moments/")
        if any(isinstance(m, Factors) or m.ndim != 3 or m.shape[0] != 2 for m in moments.values()):
            raise ValueError("state field moments must hold one dense 2 x d_out x d_in array per layer")
        self.moments = moments


def _factor_table(state: dict[str, np.ndarray], prefix: str) -> dict[str, Factors | torch.Tensor]:
    """``module -> Factors or dense tensor`` from the keys ``<prefix><module>/<u|s|v|dense>``."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            module, _, leaf = key[len(prefix):].rpartition("/")
            parts.setdefault(module, {})[leaf] = value
    return {
        module: torch.from_numpy(p["dense"]) if "dense" in p else Factors(*(torch.from_numpy(p[leaf]) for leaf in "usv"))
        for module, p in parts.items()
    }


def _positive_or_none(value, name: str) -> float | None:
    """A carried median: None, or a finite number >= 0 (else a ValueError naming the field)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"state field {name} is {value!r}, not a finite number >= 0")
    return float(value)
