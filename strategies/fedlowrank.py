"""FedLowRank: FedAvg whose adapter factors are aggregated by a registered rule.

The round itself (rule, mixed-rank completion, residual modes, robust clipping, server
learning rate, hand-back) is the core's :class:`fedlowrank.aggregation.round.ServerRound`;
this class is message handling around it: screen each reply, hand its arrays to the
round, build the ``ArrayRecord`` and ``MetricRecord``.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlowrank.aggregation.round import RoundConfig, ServerRound
from fedlowrank.aggregation.rules import AggregationRule
from fedlowrank.aggregation.state import LowRankState
from fedlowrank.aggregation.validate import MAX_WEIGHT
from fedlowrank.wire import FROZEN_KEY, TRUNCATION_KEY

from .replies import aggregate_reply_metrics, check_records, default_reply_bytes, reply_arrays, reply_weight, screen_evaluate_replies, share_weight_cap, weighted_metrics


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
    rule, rule_options, residual, rank, align, gauge, balance_cap, dense_above, dense_products, max_weight, share_cap, node_max_weights, robust, robust_factor, min_valid_replies, server_learning_rate, momentum, server_optimizer, server_betas, server_tau, step_decay, tail_weight
        What the round does: :class:`fedlowrank.aggregation.round.RoundConfig` (documented
        there, kept as ``self.config``).
    evaluate_metric_keys : str or re.Pattern, optional
        The evaluate metric names the clients send (a regular expression, matched in full);
        a reply's other keys are left out with its node named. None keeps every key (a
        key one site alone sends still averages over that site only).
    max_reply_bytes : int, optional
        Largest reply (its arrays' bytes), checked before anything is read; default
        twice the global arrays in float64 plus 1 MiB.
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
        dense_products: str = "auto",
        max_reply_bytes: int | None = None,
        max_weight: float = MAX_WEIGHT,
        share_cap: float | None = 10.0,
        node_max_weights: Mapping[Any, float] | None = None,
        robust: str | None = None,
        robust_factor: float = 3.0,
        min_valid_replies: int = 1,
        server_learning_rate: float = 1.0,
        momentum: float = 0.0,
        server_optimizer: str | None = None,
        server_betas: tuple[float, float] = (0.9, 0.99),
        server_tau: float = 1e-3,
        step_decay: float = 1.0,
        tail_weight: float = 1.0,
        aggregation_method: str | None = None,
        balance_cap: float | None = 1.0,
        evaluate_metric_keys: str | re.Pattern | None = None,
        **kwargs,
    ) -> None:
        # Per-metric normalisation: a metric left out of one reply does not bias the mean.
        kwargs.setdefault("train_metrics_aggr_fn", weighted_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", weighted_metrics)
        super().__init__(**kwargs)
        options = dict(rule_options or {})
        if aggregation_method is not None:
            warnings.warn("FedLowRank(aggregation_method=...) is deprecated; use rule_options={'method': ...}", DeprecationWarning, stacklevel=2)
            options.setdefault("method", aggregation_method)
        self.config = RoundConfig(
            rule=rule, rule_options=options, residual=residual, rank=rank, align=align, gauge=gauge,
            balance_cap=balance_cap, dense_above=dense_above, dense_products=dense_products, max_weight=max_weight, share_cap=share_cap,
            node_max_weights=node_max_weights, robust=robust,
            robust_factor=robust_factor, min_valid_replies=min_valid_replies,
            server_learning_rate=server_learning_rate, momentum=momentum, server_optimizer=server_optimizer,
            server_betas=server_betas, server_tau=server_tau, step_decay=step_decay, tail_weight=tail_weight,
        )
        self.max_reply_bytes = max_reply_bytes
        # Where the clients are known (the apps': fedlowrank.wire.EVALUATE_METRICS), any other key is left out.
        self.evaluate_metric_keys = re.compile(evaluate_metric_keys) if isinstance(evaluate_metric_keys, str) else evaluate_metric_keys
        self.state = LowRankState()

    @property
    def rule(self) -> AggregationRule:
        """The aggregation rule (``config.rule``)."""
        return self.config.rule

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything this strategy carries across rounds (see :class:`LowRankState`)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`."""
        self.state.load_state_dict(state)

    def summary(self) -> None:
        """Log the configuration, FedAvg's and ours."""
        super().summary()
        c = self.config
        log(
            INFO,
            "\t└──> Low-rank aggregation: rule '%s', rank %s, residual '%s', gauge '%s', server learning rate %g, momentum %g",
            c.rule.name, c.rank or "as sent", c.residual, c.gauge, c.server_learning_rate, c.momentum,
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
        global_arrays = {k: a.numpy() for k, a in arrays.items()}
        self.config.check_fits(global_arrays)
        self.state.global_arrays = global_arrays
        self.state.server_round = server_round
        with flower_quiet():
            return list(super().configure_train(server_round, arrays, self.client_config(config), grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg, with what clients need to load the global adapter."""
        with flower_quiet():
            return list(super().configure_evaluate(server_round, arrays, self.client_config(config), grid))

    # -- aggregate ------------------------------------------------------------
    def group_shares(self) -> np.ndarray | None:
        """Group shares sent this round (grouped adapters order columns by them)."""
        shares = self.state.group_shares
        return None if shares is None else np.asarray(shares, dtype=np.float64)

    def reply_counts(self, msg: Message, rnd: ServerRound) -> np.ndarray | None:
        """Per-group sample counts of a reply (FairLoRA reads them); None here."""
        return None

    def add_reply(self, rnd: ServerRound, msg: Message, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Screen one reply and hand its arrays (read from ``msg`` unless given) to the round; raises on anything wrong."""
        if msg.has_error():
            raise ValueError(msg.error.reason)
        check_records(msg.content)
        if arrays is None:
            arrays = reply_arrays(msg.content, rnd.sent.keys(), self.max_reply_bytes or default_reply_bytes(self.state.global_arrays))
        weight = reply_weight(msg.content, self.weighted_by_key, self.config.max_weight)
        rnd.add(arrays, weight, self.reply_counts(msg, rnd), node=msg.metadata.src_node_id)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold the valid replies into the round one at a time; a bad reply is logged and dropped."""
        return self.aggregate_arrays(server_round, ((msg, None) for msg in replies))

    def aggregate_arrays(
        self, server_round: int, replies: Iterable[tuple[Message, dict[str, np.ndarray] | None]]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """:meth:`aggregate_train` for replies whose arrays a wrapper already decoded (L-GreCo):
        ``(message, arrays)`` pairs, ``arrays`` None where they are to be read from the message."""
        if self.state.global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        rnd = ServerRound(self.config, self.state, log=log)
        kept, seen = [], 0
        for msg, arrays in replies:
            seen += 1
            try:
                self.add_reply(rnd, msg, arrays)
                kept.append(msg)
            except Exception as err:  # noqa: BLE001  (no reply may crash the round)
                log(WARNING, "Dropping reply from node %s: %s", msg.metadata.src_node_id, err)
        try:
            result = rnd.finish()
        except Exception as err:  # noqa: BLE001  (a numerical failure must not end the run)
            log(ERROR, "aggregate_train: aggregation failed (%s: %s); the global model is kept", type(err).__name__, err)
            return None, None
        if result.arrays is None:
            return None, None
        accepted = set(rnd.accepted)
        metrics = self.round_metrics([m for m in kept if m.metadata.src_node_id in accepted], seen, rnd.weight_cap)
        metrics.update(result.metrics)
        # np.array(order="C"), not np.ascontiguousarray, which turns a 0-d array into shape (1,).
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in result.arrays.items()}), metrics

    def round_metrics(self, kept: list[Message], seen: int, weight_cap: float | None = None) -> MetricRecord:
        """The accepted replies' train metrics, aggregated (weights capped as in the round), plus how many were kept/dropped."""
        metrics = aggregate_reply_metrics(self.train_metrics_aggr_fn, kept, self.weighted_by_key, "train", weight_cap)
        metrics["agg-clients-dropped"] = seen - len(kept)
        metrics["agg-clients-kept"] = len(kept)
        return metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's metric aggregation over the evaluate replies that pass the checks.

        A reply with an error, a missing or bad weight, several MetricRecords or a
        non-finite metric is dropped with its node named; a metric of another type or
        length than the other replies' is left out of that reply only.
        """
        kept, dropped = screen_evaluate_replies(list(replies), self.weighted_by_key, self.config.max_weight,
                                                self.config.node_max_weights)
        if not kept:
            return None
        cap = share_weight_cap(kept, self.weighted_by_key, self.config.share_cap)  # as in training
        metrics = aggregate_reply_metrics(self.evaluate_metrics_aggr_fn, kept, self.weighted_by_key, "evaluate", cap,
                                          self.evaluate_metric_keys)
        metrics["eval-clients-dropped"] = dropped
        return metrics
