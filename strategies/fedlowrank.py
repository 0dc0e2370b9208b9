"""FedLowRank: FedAvg whose adapter factors are aggregated by a registered rule."""

from __future__ import annotations

from collections.abc import Iterable
import logging
import re
from contextlib import contextmanager
from logging import DEBUG, ERROR, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlowrank.adapters import is_fold_key, split_factor_key
from fedlowrank.aggregation import balance_factors, lora_gauge_factors, procrustes_align
from fedlowrank.aggregation.accumulate import WeightedSum, compact
from fedlowrank.aggregation.ranks import Factors
from fedlowrank.aggregation.rules import Accumulator, AggregationRule, RuleResult, get_rule
from fedlowrank.wire import FROZEN_KEY, REPLY_NODE_KEY, TRUNCATION_KEY

from .replies import (
    MAX_WEIGHT,
    consistent_metrics,
    default_reply_bytes,
    reply_arrays,
    reply_weight,
    screen_evaluate_replies,
    weighted_metrics,
)
from .state import LowRankState

RESIDUAL_MODES = ("drop", "carry", "fold")
PEFT_FACTOR = re.compile(r"\.lora_[AB](\.[^.]+)?\.weight$|\.lora_embedding_[AB]")
"""PEFT's LoRA parameter names (``...q_proj.lora_A.default.weight``)."""


@contextmanager
def flower_quiet():
    """Silence Flower's per-round INFO lines (node sampling): the run logs one line per round."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(max(level, WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def factor_modules(keys: Iterable[str]) -> list[str]:
    """Names of the adapted modules among ArrayRecord keys, in first-seen order."""
    seen: dict[str, None] = {}
    for key in keys:
        split = split_factor_key(key)
        if split is not None:
            seen.setdefault(split[0], None)
    return list(seen)


def layer_factors(arrays, module: str) -> Factors:
    """``(U, S, V)`` of one module from a mapping of numpy arrays, as float64 tensors."""
    u, s, v = (torch.from_numpy(np.array(arrays[f"{module}.{leaf}"], dtype=np.float64)) for leaf in ("lora_U", "lora_S", "lora_V"))
    return Factors(u, s.reshape(-1, u.shape[1]) if s.ndim != 2 else s, v)


def as_array(value: np.ndarray) -> Array:
    """A C-contiguous ``Array`` keeping the shape (``np.ascontiguousarray`` turns 0-d into (1,))."""
    return Array(np.array(value, order="C"))


class FedLowRank(FedAvg):
    """Federated averaging of SVD-factored adapters by a named aggregation rule.

    For every adapted layer (keys ``<module>.lora_U``, ``.lora_S``, ``.lora_V``, with
    ``dW = U diag(S) V^T``) the replies are folded into the rule's accumulator one at a
    time (:mod:`fedlowrank.aggregation.rules`); the result at the global rank goes back to
    clients balanced as ``U = u sqrt(s)``, ``S = 1``, ``V = v sqrt(s)`` (the scale Adam
    trains stably at, docs/design.md step 6), aligned to last round's factors. Every other
    array (heads, norms) is a weighted mean, as in FedAvg (integer arrays become float64
    means, as in FedAvg; shapes, 0-d included, are kept).

    Clients may use different ranks (up to the global rank). A client of rank ``r`` loads
    the best rank-``r`` approximation of the global adapter, and the server completes its
    reply with the components it could not hold (:mod:`fedlowrank.aggregation.ranks`): a
    round in which no client changes its adapter leaves the global unchanged.

    Parameters
    ----------
    rule : str or AggregationRule (default: "exact")
        A registered rule (:func:`fedlowrank.aggregation.rules.registered_rules`).
    rule_options : dict, optional
        Options of a rule given by name.
    residual : {"drop", "carry", "fold"}, optional
        What the global rank could not hold: dropped (its norm is reported); carried into
        the next round's sum on the server, so that over rounds nothing is lost; or folded
        into the clients' frozen base (FedEx-LoRA style: sent as ``<module>.fold_U`` /
        ``.fold_V`` factors, rank at most the layer's size). Exact rules only; the default
        is the rule's first mode (``drop``; ``fold`` for ``flora``). See ``docs/aggregation.md``.
    rank : int, optional
        Global adapter rank; defaults to the rank of the initial arrays. Clamped per layer
        to ``min(d_out, d_in)``, with a log line.
    align : bool (default: True)
        Rotate each balanced G = 1 aggregate (``U R``, ``V R``, same product) to match the
        factors sent last round (orthogonal Procrustes), so clients' parameters move
        smoothly instead of jumping to a new SVD basis. Measured on the two-scanner digits
        setting (5 paired seeds, 20 rounds): final AUC 0.956 aligned vs 0.942 unaligned.
    gauge : {"balanced", "lora"} (default: "balanced")
        How an orthonormal G = 1 aggregate ``u diag(s) v^T`` is split for clients (the
        product is the same): ``"balanced"``, ``U = u sqrt(s)``, ``V = v sqrt(s)``; or
        ``"lora"``, ``V = v / sqrt(3)`` (LoRA's init size for every column) and
        ``U = u s sqrt(3)``, the gauge FedIT's clients keep. Measured in
        ``docs/results.md``.
    dense_above : int, optional
        Stacked width beyond which a layer's sum is accumulated densely (default half the
        layer's smaller side; see :mod:`fedlowrank.aggregation.accumulate`).
    max_reply_bytes : int, optional
        Largest reply (its arrays' bytes), checked before anything is read; default
        twice the global arrays in float64 plus 1 MiB.
    max_weight : float (default: 1e9)
        Largest accepted weight (``num-examples``) and per-group count; a reply above it is
        dropped (one site claiming 1e30 examples would otherwise become the global model).
    robust : {None, "clip", "reject"} (default: None)
        Bound each client's update norm (its completed adapter products and other arrays,
        relative to the global sent) by ``robust_factor`` times the round's median: clip
        it to the bound, or drop the reply. Needs 3 or more valid replies. A client's pull
        on the global is then at most its share times the bound. Cost on clean runs:
        ``docs/reliability.md``.
    robust_factor : float (default: 3.0)
    min_valid_replies : int (default: 1)
        Fewer valid replies than this keep the previous global (and the log says so).
    server_learning_rate : float (default: 1.0)
        The share of the round's aggregate change the global takes, in ``(0, 1]`` (as in
        Flower's ``FedAvgM``, without momentum): every client's change is scaled by it
        before aggregation (its completed product becomes ``G + lr (P + T - G)``, its other
        arrays ``g + lr (a - g)``), so under an exact rule the new global is the best
        rank-r approximation of ``G + lr (M - G)``, ``M`` the exact weighted mean.
        Momentum is left out: its state would be a dense ``d_out x d_in`` matrix or
        a rank growing every round.
    aggregation_method : {"gram", "qr"}, optional
        Deprecated: use ``rule_options={"method": ...}`` with rule ``"exact"``.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.

    Notes
    -----
    A reply that fails the checks (shapes, ranks, values, weight, the rule's own) is
    logged with its node id and dropped; the round goes on with the others, and with no
    valid reply the global model is kept. The train MetricRecord gains
    ``agg-error-rel`` (mean over layers of ``||M - result|| / ||M||`` against the exact
    weighted sum ``M``; for ``exact`` this is what the rank could not hold, also reported
    as ``agg-truncation-rel``), ``agg-clients-dropped`` and ``agg-clients-kept``.
    """

    def __init__(
        self,
        *,
        rule: str | AggregationRule = "exact",
        rule_options: dict[str, Any] | None = None,
        residual: str | None = None,
        rank: int | None = None,
        align: bool = True,
        gauge: str = "balanced",
        dense_above: int | None = None,
        max_reply_bytes: int | None = None,
        max_weight: float = MAX_WEIGHT,
        robust: str | None = None,
        robust_factor: float = 3.0,
        min_valid_replies: int = 1,
        server_learning_rate: float = 1.0,
        aggregation_method: str | None = None,
        **kwargs,
    ) -> None:
        # Per-metric normalisation: a metric left out of one reply does not bias the mean.
        kwargs.setdefault("train_metrics_aggr_fn", weighted_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", weighted_metrics)
        super().__init__(**kwargs)
        if not 0.0 < server_learning_rate <= 1.0:
            raise ValueError(f"server_learning_rate must be in (0, 1], got {server_learning_rate}")
        self.server_learning_rate = float(server_learning_rate)
        if gauge not in ("balanced", "lora"):
            raise ValueError(f"gauge must be 'balanced' or 'lora', got {gauge!r}")
        self.gauge = gauge
        if robust not in (None, "clip", "reject"):
            raise ValueError(f"robust must be None, 'clip' or 'reject', got {robust!r}")
        if not robust_factor > 0 or not max_weight > 0 or min_valid_replies < 1:
            raise ValueError("need robust_factor > 0, max_weight > 0 and min_valid_replies >= 1")
        self.max_reply_bytes = max_reply_bytes
        self.max_weight = float(max_weight)
        self.robust = robust
        self.robust_factor = float(robust_factor)
        self.min_valid_replies = int(min_valid_replies)
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        options = dict(rule_options or {})
        if aggregation_method is not None:
            import warnings

            warnings.warn(
                "FedLowRank(aggregation_method=...) is deprecated; use rule_options={'method': ...}",
                DeprecationWarning,
                stacklevel=2,
            )
            options.setdefault("method", aggregation_method)
        self.rule = get_rule(rule, **options)
        residual = self.rule.residual_modes[0] if residual is None else residual
        if residual not in RESIDUAL_MODES:
            raise ValueError(f"unknown residual mode {residual!r}; choose one of {RESIDUAL_MODES}")
        if residual not in self.rule.residual_modes:
            needs = "needs an exact rule" if not self.rule.residual else "is not available"
            raise ValueError(
                f"residual mode {residual!r} {needs}; rule '{self.rule.name}' supports {list(self.rule.residual_modes)}"
            )
        self.residual = residual
        self.rank = rank
        self.align = align
        self.dense_above = dense_above
        self.state = LowRankState()
        self._clamped: set[str] = set()

    # -- state ----------------------------------------------------------------
    @property
    def _global_arrays(self) -> ArrayRecord | None:
        """The arrays sent this round, as an ArrayRecord (None before round 1)."""
        arrays = self.state.global_arrays
        return None if arrays is None else ArrayRecord({k: as_array(v) for k, v in arrays.items()})

    @_global_arrays.setter
    def _global_arrays(self, record: ArrayRecord) -> None:
        self.state.global_arrays = {k: a.numpy() for k, a in record.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything this strategy carries across rounds (see :class:`LowRankState`)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`."""
        self.state.load_state_dict(state)

    def summary(self) -> None:
        """Log the configuration, FedAvg's and ours."""
        super().summary()
        log(
            INFO,
            "\t└──> Low-rank aggregation: rule '%s', rank %s, residual '%s', gauge '%s', server learning rate %g",
            self.rule.name, self.rank or "as sent", self.residual, self.gauge, self.server_learning_rate,
        )

    # -- configure ------------------------------------------------------------
    def client_config(self, config: ConfigRecord) -> ConfigRecord:
        """The round's config plus what clients need to load the global adapter."""
        config[TRUNCATION_KEY] = self.rule.truncation
        if self.rule.frozen:
            config[FROZEN_KEY] = list(self.rule.frozen)
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays (replies are checked against them), then as FedAvg."""
        self.state.global_arrays = {k: a.numpy() for k, a in arrays.items()}
        self.state.server_round = server_round
        self.check_rule_fits()
        with flower_quiet():
            return list(super().configure_train(server_round, arrays, self.client_config(config), grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg, with what clients need to load the global adapter."""
        with flower_quiet():
            return list(super().configure_evaluate(server_round, arrays, self.client_config(config), grid))

    def check_rule_fits(self) -> None:
        """Refuse, before any client trains, a global adapter the rule cannot aggregate."""
        peft = sorted(k for k in self.state.global_arrays if PEFT_FACTOR.search(k))
        if peft:
            raise ValueError(
                f"PEFT LoRA factors ({peft[0]}, ...) reached FedLowRank: averaging lora_A and lora_B "
                "separately is not the average of B A, and FedLowRank does not do that silently. Send "
                "fedlowrank.adapters.exchange_state(peft_model) instead: it reads each layer's (B, A, "
                "scaling) as exact factors, and load_exchange_state writes the aggregate back into PEFT"
            )
        for module in factor_modules(self.state.global_arrays):
            rows = np.shape(self.state.global_arrays[f"{module}.lora_S"])[0]
            if rows > 1 and not self.rule.grouped:
                raise ValueError(
                    f"{module}: S has {rows} group rows; rule '{self.rule.name}' aggregates G = 1 "
                    "adapters (use FairLoRA for grouped ones)"
                )
            if rows > 1 and self.residual == "fold":
                raise ValueError(f"{module}: residual mode 'fold' needs G = 1 (one base for every group)")

    # -- aggregate ------------------------------------------------------------
    def layer_rank(self, module: str) -> int:
        """The global rank of one layer: ``rank`` (or the sent width), clamped to its size."""
        u = self.state.global_arrays[f"{module}.lora_U"]
        v = self.state.global_arrays[f"{module}.lora_V"]
        want = self.rank or u.shape[1]
        limit = min(u.shape[0], v.shape[0])
        if want > limit and module not in self._clamped:
            self._clamped.add(module)
            log(INFO, "%s: global rank %d clamped to min(d_out, d_in) = %d", module, want, limit)
        return min(want, limit)

    def group_shares(self) -> torch.Tensor | None:
        """Group shares sent this round (grouped adapters order columns by them)."""
        shares = self.state.group_shares
        return None if shares is None else torch.as_tensor(shares, dtype=torch.float64)

    def new_accumulators(self) -> dict[str, Accumulator]:
        """One accumulator per adapted layer, against the factors sent this round."""
        global_arrays = self.state.global_arrays
        accs = {}
        for index, module in enumerate(factor_modules(global_arrays)):
            reference = layer_factors(global_arrays, module)
            seed = self.state.server_round * 100_003 + index
            accs[module] = self.rule.accumulator(reference, self.group_shares(), dense_above=self.dense_above, seed=seed)
        return accs

    def read_reply(
        self, msg: Message, accs: dict[str, Accumulator], expected: ArrayRecord
    ) -> tuple[dict[str, np.ndarray], float, Any]:
        """Checked ``(arrays, weight, extra)`` of one reply; raises on anything wrong."""
        limit = self.max_reply_bytes or default_reply_bytes(self.state.global_arrays)
        arrays = reply_arrays(msg.content, expected, limit)
        weight = reply_weight(msg.content, self.weighted_by_key, self.max_weight)
        for module, acc in accs.items():
            try:
                self.rule.check(layer_factors(arrays, module), acc.reference)
            except ValueError as err:
                raise ValueError(f"'{module}': {err}") from None
        return arrays, weight, self.reply_extra(msg, weight)

    def reply_extra(self, msg: Message, weight: float) -> Any:
        """Per-reply data a subclass needs (FairLoRA: per-group counts); None here."""
        return None

    def group_weights(self, extra: Any) -> torch.Tensor | None:
        """Per-group product weights of a reply (None: its sample weight for every group)."""
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold the valid replies into the rule's accumulators, one reply at a time."""
        if self.state.global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        accs = self.new_accumulators()
        # Fold factors travel server -> client only: replies carry everything else.
        sent = {k: v for k, v in self.state.global_arrays.items() if not is_fold_key(k)}
        expected = ArrayRecord({k: as_array(v) for k, v in sent.items()})
        plain_keys = [k for k in sent if split_factor_key(k) is None]
        # Pass 1: check every reply (arrays are read as views into the messages).
        kept, seen = [], 0
        for msg in replies:
            seen += 1
            try:
                if msg.has_error():
                    raise ValueError(msg.error.reason)
                kept.append((msg, *self.read_reply(msg, accs, expected)))
            except Exception as err:  # noqa: BLE001  (no reply may crash the round)
                log(WARNING, "Dropping reply from node %s: %s", msg.metadata.src_node_id, err)
        try:
            return self.combine(server_round, accs, kept, seen, sent, plain_keys)
        except Exception as err:  # noqa: BLE001  (a numerical failure must not end the run)
            log(ERROR, "aggregate_train: aggregation failed (%s: %s); the global model is kept", type(err).__name__, err)
            return None, None

    def combine(
        self, server_round: int, accs: dict[str, Accumulator], kept: list, seen: int,
        sent: dict[str, np.ndarray], plain_keys: list[str],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Pass 2 of :meth:`aggregate_train`: the accepted replies folded in, one at a time."""
        kept, shrinks = self.robust_filter(kept, accs, plain_keys)
        shrinks = [self.server_learning_rate * shrink for shrink in shrinks]
        sums: dict[str, np.ndarray] = {}
        total = 0.0
        for (msg, arrays, weight, extra), shrink in zip(kept, shrinks):
            for module, acc in accs.items():
                acc.add(layer_factors(arrays, module), weight, self.group_weights(extra), shrink)
            for key in plain_keys:
                ref = np.asarray(sent[key], dtype=np.float64)
                term = weight * (ref + shrink * (np.asarray(arrays[key], dtype=np.float64) - ref))
                sums[key] = term if key not in sums else sums[key] + term
            total += weight
        kept = [(msg, extra) for msg, _, _, extra in kept]
        log(DEBUG, "aggregate_train: %d of %d replies accepted", len(kept), seen)
        if len(kept) < self.min_valid_replies or total <= 0:
            log(
                WARNING, "aggregate_train: %d valid replies with positive weight (at least %d needed); "
                "the global model is kept", len(kept), self.min_valid_replies,
            )
            return None, None
        out: dict[str, np.ndarray] = {}
        errors, floors = [], []
        for module, acc in accs.items():
            if self.residual == "carry" and module in self.state.residuals:
                acc.add_carried(self.state.residuals[module])
            result = acc.result(self.layer_rank(module))
            if self.residual == "carry":
                self.state.residuals[module] = result.residual
            elif self.residual == "fold":
                out.update(self.folded(module, result.residual))
            out.update(self.hand_back(module, result, acc))
            target = result.target_norms.clamp_min(1e-300)
            errors.append(torch.where(result.target_norms > 0, result.error_norms / target, 0.0).numpy())
            if result.floor_norms is not None:
                floors.append(torch.where(result.target_norms > 0, result.floor_norms / target, 0.0).numpy())
        for key in plain_keys:
            dtype = self.state.global_arrays[key].dtype
            mean = sums[key] / total
            out[key] = mean.astype(dtype) if np.issubdtype(dtype, np.floating) else mean
        record = ArrayRecord({k: as_array(out[k]) for k in [*sent, *(k for k in out if is_fold_key(k))]})
        metrics = self.round_metrics([msg for msg, _ in kept], seen)
        metrics.update(self.error_metrics(errors, floors))
        self.after_round(kept)
        return record, metrics

    def folded(self, module: str, residual: Factors | torch.Tensor) -> dict[str, np.ndarray]:
        """Add this round's residual to the layer's fold; its factors as sent to clients.

        The fold is re-factored exactly each round (its non-zero singular triplets), so its
        rank never exceeds ``min(d_out, d_in)``; it goes out balanced, ``u sqrt(s)``, ``v sqrt(s)``.
        """
        reference = self.state.global_arrays[f"{module}.lora_U"], self.state.global_arrays[f"{module}.lora_V"]
        acc = WeightedSum(reference[0].shape[0], reference[1].shape[0])
        previous = self.state.residuals.get(module)
        if previous is not None:
            acc.add_normalised(previous)
        acc.add_normalised(residual)
        fold = compact(acc)
        self.state.residuals[module] = fold
        root = fold.s[0].clamp_min(0).sqrt()
        dtype = reference[0].dtype
        return {f"{module}.fold_U": (fold.u * root).numpy().astype(dtype), f"{module}.fold_V": (fold.v * root).numpy().astype(dtype)}

    def robust_filter(self, kept: list, accs: dict[str, Accumulator], plain_keys: list[str]) -> tuple[list, list[float]]:
        """The replies to aggregate and each one's shrink factor (1 unless ``robust``).

        ``robust="clip"`` scales every update larger than ``robust_factor`` times the round's
        median update norm down to that bound; ``"reject"`` drops it (logged by node).
        """
        if self.robust is None or len(kept) < 3:  # a median of fewer says nothing
            return kept, [1.0] * len(kept)
        norms = np.array([self.update_norm(arrays, accs, plain_keys) for _, arrays, _, _ in kept])
        bound = self.robust_factor * float(np.median(norms))
        out, shrinks = [], []
        for entry, norm in zip(kept, norms):
            if norm <= bound or norm == 0:
                out.append(entry)
                shrinks.append(1.0)
            elif self.robust == "clip":
                log(WARNING, "Clipping update of node %s: norm %.3g above %.3g", entry[0].metadata.src_node_id, norm, bound)
                out.append(entry)
                shrinks.append(bound / norm)
            else:
                log(WARNING, "Dropping reply from node %s: update norm %.3g above %.3g", entry[0].metadata.src_node_id, norm, bound)
        return out, shrinks

    def update_norm(self, arrays: dict[str, np.ndarray], accs: dict[str, Accumulator], plain_keys: list[str]) -> float:
        """The norm of a reply's change: adapter products (completed) and plain arrays."""
        square = sum(acc.change_norm(layer_factors(arrays, module)) ** 2 for module, acc in accs.items())
        sent = self.state.global_arrays
        square += sum(float(np.sum((np.asarray(arrays[k], dtype=np.float64) - np.asarray(sent[k], dtype=np.float64)) ** 2)) for k in plain_keys)
        return float(np.sqrt(square))

    def after_round(self, kept: list) -> None:
        """Hook: update state from the round's accepted replies (FairLoRA: group shares)."""

    def hand_back(self, module: str, result: RuleResult, acc: Accumulator) -> dict[str, np.ndarray]:
        """The layer's factors as sent to clients: balanced and aligned if orthonormal."""
        u, s, v = result.factors
        if result.magnitude_in_s:
            u, s, v = (lora_gauge_factors if self.gauge == "lora" else balance_factors)(u, s[0], v)
            prev_u, prev_v = self.previous_factors(module)
            if self.align and prev_u.shape == u.shape:
                u, v = procrustes_align(u, v, prev_u, prev_v)
        return self.layer_arrays(module, Factors(u, s, v))

    def previous_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``U`` and ``V`` this round's clients received, in float64 (alignment targets)."""
        reference = layer_factors(self.state.global_arrays, module)
        return reference.u, reference.v

    def layer_arrays(self, module: str, factors: Factors) -> dict[str, np.ndarray]:
        """Factors as numpy arrays in the dtype the global model uses."""
        dtype = self.state.global_arrays[f"{module}.lora_U"].dtype
        return {f"{module}.{leaf}": t.numpy().astype(dtype) for leaf, t in zip(("lora_U", "lora_S", "lora_V"), factors)}

    def round_metrics(self, kept: list[Message], seen: int) -> MetricRecord:
        """The accepted replies' train metrics, aggregated, plus how many were kept/dropped."""
        metrics = None
        try:
            metrics = self.train_metrics_aggr_fn(consistent_metrics(kept, self.weighted_by_key), self.weighted_by_key)
        except Exception as err:  # noqa: BLE001  (a bad metric must not lose the round)
            log(WARNING, "train metrics not aggregated: %s", err)
        metrics = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
        metrics["agg-clients-dropped"] = seen - len(kept)
        metrics["agg-clients-kept"] = len(kept)
        return metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's metric aggregation over the evaluate replies that pass the checks.

        A reply with an error, a missing or bad weight, several MetricRecords or a
        non-finite metric is dropped with its node named; a metric of another type or
        length than the other replies' is left out of that reply only.
        """
        replies = list(replies)
        kept, dropped = screen_evaluate_replies(replies, self.weighted_by_key, self.max_weight)
        if not kept:
            return None
        contents = []
        for msg, clean in zip(kept, consistent_metrics(kept, self.weighted_by_key)):
            content = RecordDict({**{k: v for k, v in msg.content.items() if not isinstance(v, MetricRecord)}, **clean})
            content[REPLY_NODE_KEY] = ConfigRecord({"node-id": int(msg.metadata.src_node_id)})
            contents.append(content)
        try:
            metrics = self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as err:  # noqa: BLE001
            log(WARNING, "evaluate metrics not aggregated: %s", err)
            metrics = None
        metrics = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
        metrics["eval-clients-dropped"] = dropped
        return metrics

    @staticmethod
    def error_metrics(errors: list[np.ndarray], floors: list[np.ndarray]) -> dict[str, float]:
        """Mean relative aggregation error over layers (per group when grouped), and the floor."""
        if not errors:
            return {}
        table = np.stack(errors)  # layers x G
        out = {"agg-error-rel": float(np.mean(table))}
        if table.shape[1] == 1:
            out["agg-truncation-rel"] = out["agg-error-rel"]
        else:
            for g in range(table.shape[1]):
                out[f"agg-error-rel-g{g}"] = float(np.mean(table[:, g]))
        if floors:
            out["agg-floor-rel"] = float(np.mean(np.stack(floors)))
        return out
