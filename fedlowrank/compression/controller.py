"""L-GreCo's server side without Flower: the schedule, the pooled tables, the allocation.

:class:`LGreCoController` holds every cross-round decision of layer-wise adaptive
compression in one :class:`LGreCoState` (``state_dict`` / ``load_state_dict``, as torch's
``PowerSGDState`` keeps a compressor's): the per-tensor settings, when tables are asked
for, the allocation history. A round is

1. :meth:`LGreCoController.begin_round` with the tensors sent (new ones start at the
   default) and :meth:`~LGreCoController.tables_wanted` (whether clients measure the
   candidates this round);
2. :meth:`~LGreCoController.decode` for each reply's payload: the arrays the client
   trained, reconstructed from the global arrays sent plus the decoded update;
3. :meth:`~LGreCoController.end_round` with the reply tables: on the schedule, the
   allocator re-chooses every tensor's setting.

``fedlowrank.strategies.LGreCo`` is the Flower wrapper around it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..aggregation.ranks import factor_ranks, fit_arrays_to_ranks
from ..wire import split_factor_key
from .allocate import DEFAULT_NUM_BINS, allocate_or_uniform, feedback_errors, lgreco_allocate
from .codec import candidate_key
from .update import decode_update, size_table, table_rows

# The grid benchmarks/communication.py measures. No Top-K below 5%: under error feedback
# such a setting defers nearly all of a tensor's update, and its residual grows round after round.
DEFAULT_CANDIDATES = (
    "none",
    *(f"powersgd:{k}" for k in (1, 2, 3, 4)),
    *(f"topk:{d}" for d in (0.05, 0.1, 0.2, 0.3)),
    *(f"qsgd:{b}" for b in (2, 3, 4, 6, 8)),
    *(f"sq:{b}" for b in (1, 2, 3, 4)),
)

_logger = logging.getLogger(__name__)


def pooled(tables: list[np.ndarray]) -> np.ndarray:
    """The clients' tables pooled cell by cell: the mean of one or two, the median of more.

    A table is a client's claim about its own update; with three or more clients the
    median stays within the honest clients' range whatever one client claims.
    """
    stack = np.stack(tables)
    return np.median(stack, axis=0) if len(tables) >= 3 else stack.mean(axis=0)


def lower_rank_factor(base: Mapping[str, np.ndarray]) -> Callable[[str, tuple[int, ...]], bool]:
    """Accept, for adapter factors only, a declared shape of lower rank than the global's."""

    def accept(name: str, shape: tuple[int, ...]) -> bool:
        if split_factor_key(name) is None or len(shape) != 2:
            return False
        rows, cols = np.shape(base[name])
        return shape[0] == rows and 1 <= shape[1] < cols

    return accept


@dataclass
class LGreCoConfig:
    """What L-GreCo does; the same every round.

    Parameters
    ----------
    candidates : sequence of str or (name, setting) tuples
        Settings the allocator may choose from, e.g. ``"powersgd:4"`` or
        ``("topk", 0.05)``.
    default : str or tuple, default "powersgd:4"
        Uniform setting used during warm-up; its total error, times
        ``alpha``, is the allocator's error budget. Must be a candidate.
    alpha : float, default 1.0
        Budget slack (L-GreCo's error threshold relative to the default).
    warmup_rounds : int, default 1
        Rounds at the uniform default before the first allocation; the first
        allocation uses the tables of round ``max(1, warmup_rounds)``.
    reallocate_every : int, default 5
        Rounds between allocations after warm-up (the base interval).
    max_interval_factor : int, default 4
        Cap on the interval's growth: an allocation that leaves the settings
        unchanged doubles the interval, up to ``max_interval_factor *
        reallocate_every`` rounds; one that changes them resets it to
        ``reallocate_every``. ``1`` keeps the fixed schedule.
    budget_anchor : {"current", "warmup"}, default "current"
        Where the budget's reference error comes from. ``"current"``: the
        default's column of this round's tables. ``"warmup"``: the default's
        error per unit of update energy, per tensor, as measured in the first
        allocation (tables from clients that ran the uniform default), times
        this round's update energy. Later tables describe the state L-GreCo's
        own settings left behind, and the default's error on that state is
        not what the uniform default would lose. Measured
        (``benchmarks/communication.py --budget-anchor warmup``, seed 0):
        it stops the error creep against ``qsgd:4`` on the digits
        transformer (1.90x -> 0.68x the uniform error) but lets ``topk:0.3``
        overshoot there (0.83x -> 1.29x), so it is not the default.
    allocate : bool, default True
        ``False``: uniform compression, every tensor at ``default``, no tables and no
        allocation (``candidates`` defaults to ``[default]`` then).
    num_bins : int, default 1000
        Error discretisation of the allocator.
    error_model : {"feedback", "oneshot"}, default "feedback"
        What the allocator budgets: the error each setting settles at under
        the clients' error feedback (:func:`fedlowrank.compression.feedback_errors`),
        or this round's error as measured (the original L-GreCo table).
    fallback_to_uniform : bool, default True
        Never send more than the best uniform candidate within budget: when one
        costs less than the allocation plus its error tables (a table's bytes
        spread over ``reallocate_every`` rounds), use it for every tensor and ask
        for no more tables. ``False`` keeps allocating per tensor (the paper's
        L-GreCo, which does not count its tables).
    codec_options : mapping, optional
        Codec options the clients use (e.g. ``{"qsgd": {"bucket_size": 256}}``);
        the server needs them to compute the encoded sizes.

    Notes
    -----
    Tables are asked for only in rounds whose tables feed an allocation;
    every other round carries no ``"lgreco-candidates"`` and its replies no
    tables. An allocation round whose replies carry no usable tables keeps
    the current settings and asks for tables again the next round, so
    clients that never send tables only delay allocation, never stall it.

    Why the interval backs off: an allocation that returns the settings
    already in force (for the first one, the uniform default) changed
    nothing, and its tables were pure overhead; the updates' compressibility
    drifts slowly, so the next one most likely changes nothing either.
    Doubling the interval halves that overhead while the settings are stable;
    any change resets it, so a drifting model is re-allocated as often as
    configured.
    """

    candidates: Sequence[str | tuple] = DEFAULT_CANDIDATES
    default: str | tuple = "powersgd:4"
    alpha: float = 1.0
    warmup_rounds: int = 1
    reallocate_every: int = 5
    num_bins: int = DEFAULT_NUM_BINS
    error_model: str = "feedback"
    fallback_to_uniform: bool = True
    codec_options: Mapping[str, Mapping[str, Any]] | None = None
    max_interval_factor: int = 4
    budget_anchor: str = "current"
    allocate: bool = True

    def __post_init__(self) -> None:
        self.candidates = [candidate_key(c) for c in self.candidates]
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be non-empty and distinct, got {self.candidates}.")
        self.default = candidate_key(self.default)
        if self.default not in self.candidates:
            raise ValueError(f"default {self.default!r} must be one of the candidates {self.candidates}.")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be finite and >= 0, got {self.alpha!r}.")
        if self.warmup_rounds < 0 or self.reallocate_every < 1 or self.num_bins < 1 or self.max_interval_factor < 1:
            raise ValueError("Need warmup_rounds >= 0, reallocate_every >= 1, num_bins >= 1, max_interval_factor >= 1.")
        if self.error_model not in ("feedback", "oneshot"):
            raise ValueError(f"error_model must be 'feedback' or 'oneshot', got {self.error_model!r}.")
        if self.budget_anchor not in ("warmup", "current"):
            raise ValueError(f"budget_anchor must be 'warmup' or 'current', got {self.budget_anchor!r}.")
        self.alpha = float(self.alpha)
        self.codec_options = {k: dict(v) for k, v in (self.codec_options or {}).items()}

    @property
    def max_interval(self) -> int:
        """The longest the interval between allocations grows while they change nothing."""
        return int(self.max_interval_factor) * int(self.reallocate_every)


@dataclass
class LGreCoState:
    """Everything L-GreCo carries across rounds; plain JSON in :meth:`state_dict`."""

    settings: dict[str, str] = field(default_factory=dict)
    retry_allocation: bool = False
    """The last allocation round got no tables: ask again."""
    interval: int = 1
    anchor: int = 1
    """Allocations happen at ``anchor + k * interval``."""
    default_ratio: dict[str, float] | None = None
    """``budget_anchor="warmup"``: per tensor, the default's error per unit of energy."""
    uniform_fallback: str | None = None
    """Set when a uniform candidate within budget beat the allocation plus its tables."""
    allocation_history: dict[int, dict[str, str]] = field(default_factory=dict)
    allocation_details: dict[int, dict] = field(default_factory=dict)
    bytes_history: dict[int, dict[int, int]] = field(default_factory=dict)

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"lgreco": uint8 JSON}``."""
        state = {
            "settings": self.settings, "retry_allocation": self.retry_allocation, "interval": self.interval,
            "anchor": self.anchor, "default_ratio": self.default_ratio, "uniform_fallback": self.uniform_fallback,
            "allocation_history": {str(k): v for k, v in self.allocation_history.items()},
            "allocation_details": {str(k): v for k, v in self.allocation_details.items()},
            "bytes_history": {str(k): {str(n): b for n, b in v.items()} for k, v in self.bytes_history.items()},
        }
        return {"lgreco": np.frombuffer(json.dumps(state).encode(), dtype=np.uint8).copy()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`."""
        data = json.loads(bytes(np.asarray(state["lgreco"], dtype=np.uint8)).decode())
        self.settings = dict(data["settings"])
        self.retry_allocation = bool(data["retry_allocation"])
        self.interval, self.anchor = int(data["interval"]), int(data["anchor"])
        self.default_ratio = data["default_ratio"]
        self.uniform_fallback = data.get("uniform_fallback")
        self.allocation_history = {int(k): v for k, v in data["allocation_history"].items()}
        self.allocation_details = {int(k): v for k, v in data["allocation_details"].items()}
        self.bytes_history = {int(k): {int(n): b for n, b in v.items()} for k, v in data["bytes_history"].items()}


class LGreCoController:
    """L-GreCo's decisions over rounds (module docstring); ``log(level, msg, *args)`` for its lines."""

    def __init__(self, config: LGreCoConfig, state: LGreCoState | None = None, log: Callable[..., None] | None = None) -> None:
        self.config = config
        self.state = state or LGreCoState(interval=config.reallocate_every, anchor=max(1, config.warmup_rounds))
        self.log = log or _logger.log

    # -- the round ----------------------------------------------------------
    def begin_round(self, tensor_names: Sequence[str]) -> dict[str, str]:
        """The settings for the tensors sent this round: new ones start at the default."""
        self.state.settings = {k: self.state.settings.get(k, self.config.default) for k in tensor_names}
        return self.state.settings

    def tables_wanted(self, server_round: int) -> bool:
        """Whether this round's tables feed an allocation (and are asked for).

        On the schedule (``anchor + k * interval``; the interval grows while allocations
        leave the settings unchanged), or in any round after an allocation round that
        received no usable tables. Never in uniform mode or after a uniform fallback.
        """
        state = self.state
        if not self.config.allocate or state.uniform_fallback is not None:
            return False
        first = max(1, self.config.warmup_rounds)
        if server_round >= first and state.retry_allocation:
            return True
        return server_round >= state.anchor and (server_round - state.anchor) % state.interval == 0

    def decode(self, payload: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], truncation: str = "svd",
               shares: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The arrays a client trained: what it loaded (``base``, or its head at a lower
        rank) plus its decoded update. ``ValueError`` for anything the server did not ask for."""
        delta = decode_update(payload, {k: v.shape for k, v in base.items()}, self.state.settings,
                              lower_rank_factor(base), self.config.codec_options)
        ranks = {m: r for m, r in factor_ranks(delta).items() if r < base[f"{m}.lora_U"].shape[1]}
        reference = fit_arrays_to_ranks(base, ranks, truncation, shares) if ranks else base
        arrays = {}
        for name, ref in reference.items():
            if np.shape(ref) != np.shape(delta[name]):
                raise ValueError(f"tensor {name!r}: update of shape {np.shape(delta[name])} for rank-fitted {np.shape(ref)}")
            arrays[name] = np.asarray(np.asarray(ref, dtype=np.float64) + delta[name]).astype(base[name].dtype)
        return arrays

    def end_round(self, server_round: int, tables: list[tuple[np.ndarray, np.ndarray]], shapes: Mapping[str, tuple],
                  table_bytes: float = 0.0) -> None:
        """On the schedule, re-choose every tensor's setting from the round's tables."""
        if self.tables_wanted(server_round):
            self.reallocate(server_round, tables, shapes, table_bytes)

    # -- the allocation -----------------------------------------------------
    def reallocate(self, server_round: int, tables: list[tuple[np.ndarray, np.ndarray]], shapes: Mapping[str, tuple],
                   table_bytes: float = 0.0) -> None:
        """Pool the clients' tables and re-choose every tensor's setting.

        Never worse than a uniform candidate: if one within budget sends fewer bytes than
        the allocation plus its tables (one client's table bytes spread over the rounds
        until the next allocation, ``reallocate_every``), every tensor gets it and no more
        tables are asked for (:func:`fedlowrank.compression.allocate_or_uniform`).

        Tables are pooled without weights: they describe how compressible each tensor's
        update is, not how much a client counts (:func:`pooled`: the per-cell median from
        three tables on, so one poisoned table cannot steer the allocation). Under the
        "feedback" error model each client's table is turned into settled errors before
        pooling, because each client runs its own error feedback. Sizes come from the
        global shapes, not from the clients.
        """
        config, state = self.config, self.state
        if not tables:
            self.log(logging.INFO, "LGreCo: no error tables in round %s; keeping the settings, asking again.", server_round)
            state.retry_allocation = True
            return
        state.retry_allocation = False
        measured = pooled([t[0] for t in tables])
        errors = pooled([feedback_errors(e, en) for e, en in tables]) if config.error_model == "feedback" else measured
        rows = table_rows(state.settings)
        sizes = size_table({name: tuple(shapes[name]) for name in rows}, config.candidates, config.codec_options)
        default = config.candidates.index(config.default)
        # Settled errors scale with ||u||^2, one-shot errors with ||u + residual||^2.
        energy = pooled([t[1][:, 0 if config.error_model == "feedback" else 1] for t in tables])
        reference = self.reference_errors(rows, errors[:, default], energy)
        budget = config.alpha * float(reference.sum())
        try:
            if config.fallback_to_uniform:
                choice, uniform = allocate_or_uniform(
                    errors, sizes, budget, table_cost=table_bytes / config.reallocate_every, num_bins=config.num_bins
                )
            else:
                choice, uniform = lgreco_allocate(errors, sizes, budget, num_bins=config.num_bins), None
        except ValueError as err:
            self.log(logging.WARNING, "LGreCo: allocation failed in round %s (%s); keeping the current settings.", server_round, err)
            self.advance_schedule(server_round, None)
            return
        previous = dict(state.settings)
        state.settings = {name: config.candidates[c] for name, c in zip(rows, choice)}
        if uniform is not None:
            state.uniform_fallback = config.candidates[uniform]
            self.log(
                logging.INFO,
                "LGreCo: round %s: uniform %s (%.0f B per client) is within budget and cheaper than a per-tensor "
                "allocation plus its tables (%.0f B of tables every %d rounds): using it, no more tables.",
                server_round, state.uniform_fallback, sizes[:, uniform].sum(), table_bytes, config.reallocate_every,
            )
        self.advance_schedule(server_round, state.settings != previous)
        state.allocation_history[server_round] = dict(state.settings)
        picked = np.arange(len(rows)), choice
        state.allocation_details[server_round] = {
            "tables": len(tables),
            "size_ratio": float(sizes[picked].sum() / sizes[:, default].sum()),
            # Estimated error vs the uniform default, in the budgeted model and as measured this round (one-shot).
            "error_ratio": float(errors[picked].sum() / max(reference.sum(), 1e-300)),
            "measured_error_ratio": float(measured[picked].sum() / max(measured[:, default].sum(), 1e-300)),
            "changed": state.settings != previous,
            "next_allocation": state.anchor + state.interval,
            "uniform_fallback": state.uniform_fallback,
            "table_bytes_per_client": table_bytes,
        }
        self.log(
            logging.INFO, "LGreCo: round %s allocation from %d tables: %.0f bytes (uniform %s: %.0f), error %.4g <= %.4g",
            server_round, len(tables), sizes[picked].sum(), config.default, sizes[:, default].sum(), errors[picked].sum(), budget,
        )

    def advance_schedule(self, server_round: int, changed: bool | None) -> None:
        """Move the schedule past ``server_round`` after an allocation attempt.

        ``changed`` is whether the allocation changed the settings (``None``: it failed,
        keep the interval). The anchor becomes the schedule point this allocation belonged
        to (a retried allocation keeps the original grid), then the next allocation is one
        (new) interval after it: an unchanged allocation doubles the interval (up to
        ``max_interval``), a change resets it.
        """
        state = self.state
        state.anchor += (server_round - state.anchor) // state.interval * state.interval
        if changed is True:
            state.interval = self.config.reallocate_every
        elif changed is False:
            state.interval = min(2 * state.interval, self.config.max_interval)

    def reference_errors(self, rows: list[str], current: np.ndarray, energy: np.ndarray) -> np.ndarray:
        """Per tensor, the uniform default's error the budget is taken from.

        ``current`` is the default's column of this round's pooled tables and ``energy``
        the energy it scales with. Under ``budget_anchor="warmup"`` the first call stores
        ``current / energy`` per tensor; later calls return that ratio times this round's
        energy (tensors seen for the first time use ``current``).
        """
        if self.config.budget_anchor == "current":
            return current
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(energy > 0, current / np.where(energy > 0, energy, 1.0), 0.0)
        if self.state.default_ratio is None:
            self.state.default_ratio = dict(zip(rows, ratio.tolist()))
        anchored = np.array([self.state.default_ratio.get(name, np.nan) for name in rows])
        return np.where(np.isnan(anchored), current, anchored * energy)
