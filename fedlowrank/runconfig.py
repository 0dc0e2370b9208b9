"""The run settings both sides read (the server body, the client builder, the CLI), parsed and
checked once, each wrong value named with its key and what it may be.

``RunSettings.from_config(context.run_config)`` reads the keys of the apps'
``[tool.flwr.app.config]`` (``rank``, ``client-ranks``, ``lr``, ``dp-noise-multiplier``, ...)
into typed fields (``-`` becomes ``_``); keys an app adds for itself (its dataset, say) stay
in the run config for the app to read. A key left out takes the default here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


def parse_ranks(text: str) -> list[int]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (run config ``client-ranks``); a clear error for anything but positive integers."""
    try:
        ranks = [int(r) for r in str(text).split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"client-ranks {text!r} must be comma-separated integers, e.g. '2,4,8'") from None
    if any(r < 1 for r in ranks):
        raise ValueError(f"client-ranks {text!r}: every rank must be >= 1")
    return ranks


@dataclass(frozen=True)
class RunSettings:
    """The shared run-config keys, typed; see the apps' ``pyproject.toml`` for what each does."""

    num_server_rounds: int = 8
    num_sites: int = 0
    strategy: str = "fedlowrank"
    rule: str = "exact"
    residual: str = ""
    groups: int = 1
    rank: int = 4
    client_ranks: str = ""
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    robust: str = ""
    robust_factor: float = 3.0
    node_max_weights: str = ""
    lr: float = 0.01
    local_epochs: int = 1
    batch_size: int = 128
    seed: int = 0
    results_file: str = ""
    central_evaluation: bool = True
    save_adapter: str = ""
    round_timeout: float = 3600.0
    checkpoint_dir: str = ""
    resume_from: str = ""
    resume_force: bool = False
    stop_after_round: int = 0
    compression: str = "none"
    compression_default: str = "powersgd:2"
    compression_alpha: float = 1.0
    compression_warmup: int = 1
    compression_reallocate_every: int = 5
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_target_epsilon: float = 8.0
    secure: bool = False
    secure_weight_bound: float = 1e6
    secure_value_bound: float = 1e4
    secure_sketch_width: int = 0
    secure_share_fraction: float = 1.0
    secure_threshold: float = 0.5

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **defaults: Any) -> RunSettings:
        """The settings in ``config`` (a run config), ``defaults`` where it has none.

        Raises
        ------
        ValueError
            Naming the first key whose value has the wrong type or is out of range.
        """
        values = dict(defaults)
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                values[f.name] = _typed(key, config[key], type(getattr(cls, f.name)))
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ``ValueError`` naming the key and its valid range for the first value out of range."""
        at_least = {
            "num-server-rounds": (self.num_server_rounds, 1), "num-sites": (self.num_sites, 0), "rank": (self.rank, 1),
            "groups": (self.groups, 1), "min-train-nodes": (self.min_train_nodes, 1), "local-epochs": (self.local_epochs, 1),
            "batch-size": (self.batch_size, 1), "stop-after-round": (self.stop_after_round, 0),
            "compression-warmup": (self.compression_warmup, 0), "compression-reallocate-every": (self.compression_reallocate_every, 1),
            "dp-noise-multiplier": (self.dp_noise_multiplier, 0.0), "compression-alpha": (self.compression_alpha, 0.0),
        }
        for key, (value, low) in at_least.items():
            if value < low:
                raise ValueError(f"run config '{key}' = {value!r} must be >= {low}")
        positive = {"lr": self.lr, "robust-factor": self.robust_factor, "round-timeout": self.round_timeout,
                    "dp-max-grad-norm": self.dp_max_grad_norm, "dp-target-epsilon": self.dp_target_epsilon}
        for key, value in positive.items():
            if not value > 0:
                raise ValueError(f"run config '{key}' = {value!r} must be > 0")
        for key, value in (("fraction-train", self.fraction_train), ("fraction-evaluate", self.fraction_evaluate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"run config '{key}' = {value!r} must be in [0, 1]")
        if not 0.0 < self.dp_delta < 1.0:
            raise ValueError(f"run config 'dp-delta' = {self.dp_delta!r} must be in (0, 1)")
        if self.robust.strip() not in ("", "clip", "reject", "auto"):
            raise ValueError(f"run config 'robust' = {self.robust!r} must be '', 'clip', 'reject' or 'auto'")
        if self.secure:
            if self.robust.strip() in ("clip", "reject"):
                raise ValueError(f"run config 'robust' = {self.robust!r} cannot act with secure = true: the server sees no "
                                 "single update (set robust = 'auto' or ''; secure-value-bound and secure-weight-bound "
                                 "bound each site on its side)")
            if self.compression.strip() != "none":
                raise ValueError(f"run config 'compression' = {self.compression!r} with secure = true: a masked sum "
                                 "cannot be decoded per site; use compression = 'none'")
            for key, value in (("secure-weight-bound", self.secure_weight_bound), ("secure-value-bound", self.secure_value_bound)):
                if not value > 0:
                    raise ValueError(f"run config '{key}' = {value!r} must be > 0")
            for key, value in (("secure-share-fraction", self.secure_share_fraction), ("secure-threshold", self.secure_threshold)):
                if not 0.0 < value <= 1.0:
                    raise ValueError(f"run config '{key}' = {value!r} must be in (0, 1]")
            if self.secure_sketch_width < 0:
                raise ValueError(f"run config 'secure-sketch-width' = {self.secure_sketch_width!r} must be >= 0 (0: exact)")
        declared = self.declared_weights  # parses node-max-weights
        if declared and self.secure:
            raise ValueError("run config 'node-max-weights' cannot act with secure = true: the server sees no single "
                             "weight (secure-weight-bound bounds each site on its side)")
        if self.residual.strip() not in ("", "drop", "carry", "fold"):
            raise ValueError(f"run config 'residual' = {self.residual!r} must be '', 'drop', 'carry' or 'fold'")
        ranks = self.ranks  # parses client-ranks
        # Ranks cycle over the sites (site i takes ranks[i % len]); more ranks than sites is a mistake.
        if ranks and self.num_sites and len(ranks) > self.num_sites:
            raise ValueError(
                f"run config 'client-ranks' = {self.client_ranks!r} gives {len(ranks)} ranks for num-sites = "
                f"{self.num_sites}: at most one rank per site (they repeat over the sites)"
            )

    @property
    def robust_mode(self) -> str | None:
        """``robust`` resolved: ``"auto"`` is ``"clip"`` in plain runs and off under ``secure`` (no single update to bound)."""
        mode = self.robust.strip()
        if mode == "auto":
            return None if self.secure else "clip"
        return mode or None

    @property
    def declared_weights(self) -> dict[int, float] | None:
        """``node-max-weights`` parsed: ``"<node id>:<largest weight>,..."`` (the ids Flower gave the
        sites, e.g. by ``flwr supernode register``), or None where sites are not declared."""
        text = self.node_max_weights.strip()
        if not text:
            return None
        declared: dict[int, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            node, sep, limit = item.partition(":")
            try:
                node_id, value = int(node), float(limit)
            except ValueError:
                node_id, value = -1, math.nan
            if not sep or node_id < 0 or not math.isfinite(value) or value <= 0 or node_id in declared:
                raise ValueError(f"run config 'node-max-weights': {item!r} must be '<node id>:<largest weight>' with a "
                                 "node id >= 0 given once and a weight > 0, e.g. '1234:5000,5678:800'")
            declared[node_id] = value
        return declared

    @property
    def ranks(self) -> list[int]:
        """``client-ranks`` parsed: one adapter rank per site (by partition), or none."""
        return parse_ranks(self.client_ranks)


def _typed(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or a ``ValueError`` naming the key."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"run config '{key}' = {value!r} must be true or false")
    if kind is str:
        if isinstance(value, (bool, int, float)) and not isinstance(value, str):
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"run config '{key}' = {value!r} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"run config '{key}' = {value!r} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"run config '{key}' = {value!r} must be a number") from None
    if not math.isfinite(number):
        raise ValueError(f"run config '{key}' = {value!r} must be finite")
    if kind is int:
        if number != int(number):
            raise ValueError(f"run config '{key}' = {value!r} must be a whole number")
        return int(number)
    return number
