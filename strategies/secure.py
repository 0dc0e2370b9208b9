"""Secure aggregation around FedLowRank or FairLoRA: the server learns sums, never a site's adapter.

Each round is six exchanges with the sampled nodes (:mod:`fedlowrank.secure`): setup (public
keys and ranks), key sharing, training plus the masked range sketch, unmasking, the masked
corange sketch, unmasking. The sum recovered from the two sketches enters the wrapped
strategy's :class:`~fedlowrank.aggregation.round.ServerRound` through ``add_sum``, so the
rule, the tails of lower-rank clients, the server step and momentum act on it as on
plain replies. The client side is the mod in :mod:`fedlowrank.clients.secure`, which
:func:`fedlowrank.clients.build_client_app` installs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlowrank.aggregation.round import ServerRound
from fedlowrank.aggregation.sketched import CORANGE, LABELS, RANGE, add_to_round, bases_from_range, plan_round
from fedlowrank.secure import wire
from fedlowrank.secure.secagg import SecureSetup, SecureSum, SecureSumError
from fedlowrank.wire import metric_reduction

from .fedlowrank import FedLowRank
from .replies import read_npy

DEFAULT_WEIGHT_BOUND = 1e6
DEFAULT_VALUE_BOUND = 1e4


class TrainRound(NamedTuple):
    """What one training round gave the run loop (:func:`fedlowrank.strategies.checkpoint.run`)."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    asked: list[int]
    """The nodes sampled for the round."""
    replies: list[Message]
    """The replies to the training stage (errors included), for the run's failure cause."""


class SecureLowRank(Strategy):
    """Exact low-rank aggregation under secure aggregation (SecAgg+ over Flower's primitives).

    Parameters
    ----------
    strategy : FedLowRank
        The wrapped strategy (``FedLowRank`` with a rule that sums products, or
        ``FairLoRA``), built with ``share_cap=None`` and ``robust=None``: the server sees no
        single reply to cap or clip. Each client's weight is bounded by ``weight_bound`` and
        each value it sends by ``value_bound`` instead (clipped on the client and counted).
    share_fraction : float (default: 1.0)
        Neighbours per node as a share of the sampled nodes (SecAgg+'s ring; 1: every node
        neighbours every other, SecAgg). Rounded up to an odd count, at least 3.
    threshold_fraction : float (default: 0.5)
        Shares needed to unmask, as a share of the neighbours (at least 2). A node whose
        neighbours fall below it cannot be unmasked: the round fails and keeps the global.
        A server colluding with fewer clients than this learns nothing of the others.
    weight_bound : float (default: 1e6)
        The largest sample count a client's weight can carry (above it: clipped, counted).
        Weights enter the sums as ``w / weight_bound``: a bound far above the real sizes
        costs precision (53-bit quantisation of ``+-value_bound``).
    value_bound : float (default: 1e4)
        Every value summed (sketch entries, other arrays, weighted metrics) is clipped to
        ``+-value_bound``; what was clipped is counted (``secure-clipped``).
    sketch_width : int, optional
        Columns of each layer's sketch. Default: the sum of the sampled clients' ranks (at
        most the layer's smaller side), which makes the aggregate exact to quantisation
        error; smaller widths cost fewer bytes and report ``agg-sketch-error-rel``.
    """

    def __init__(
        self,
        strategy: FedLowRank,
        *,
        share_fraction: float = 1.0,
        threshold_fraction: float = 0.5,
        weight_bound: float = DEFAULT_WEIGHT_BOUND,
        value_bound: float = DEFAULT_VALUE_BOUND,
        sketch_width: int | None = None,
    ) -> None:
        if not isinstance(strategy, FedLowRank):
            raise TypeError(f"SecureLowRank wraps FedLowRank or FairLoRA, got {type(strategy).__name__}")
        config = strategy.config
        if config.share_cap is not None or config.robust is not None or config.node_max_weights is not None:
            raise ValueError("secure aggregation: the server sees no single reply, so share_cap, node_max_weights and "
                             "robust cannot act; build the strategy with all three None (weights and values are bounded "
                             "on the clients by weight_bound and value_bound)")
        if not 0 < share_fraction <= 1 or not 0 < threshold_fraction <= 1:
            raise ValueError("share_fraction and threshold_fraction must be in (0, 1]")
        if not weight_bound > 0 or not value_bound > 0:
            raise ValueError("weight_bound and value_bound must be positive")
        self.strategy = strategy
        self.share_fraction = share_fraction
        self.threshold_fraction = threshold_fraction
        self.weight_bound = float(weight_bound)
        self.value_bound = float(value_bound)
        self.sketch_width = sketch_width

    # -- delegated ------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"inner/{k}": v for k, v in self.strategy.state_dict().items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.strategy.load_state_dict({k[len("inner/"):]: v for k, v in state.items() if k.startswith("inner/")})

    def summary(self) -> None:
        log(INFO, "\t├──> Secure aggregation (SecAgg+ sums of range sketches): neighbours %g of the sampled, threshold %g "
            "of them, weight bound %g, value bound %g, sketch width %s", self.share_fraction, self.threshold_fraction,
            self.weight_bound, self.value_bound, self.sketch_width or "exact (sum of ranks)")
        self.strategy.summary()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        raise RuntimeError("a secure round is several exchanges: drive it with train_round (fedlowrank's run loop does)")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        raise RuntimeError("a secure round is several exchanges: drive it with train_round (fedlowrank's run loop does)")

    def start(self, *args, **kwargs):
        raise RuntimeError("SecureLowRank runs in fedlowrank.strategies.checkpoint.run (Strategy.start has one exchange a round)")

    # -- the round ------------------------------------------------------------
    def train_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, timeout: float | None) -> TrainRound:
        """One secure round; a failed protocol (too many dropouts) keeps the global and says why."""
        train_messages = list(self.strategy.configure_train(server_round, arrays, config, grid))  # quiet already
        nodes = [m.metadata.dst_node_id for m in train_messages]
        exchange = _Exchange(grid, timeout, server_round)
        try:
            return self._round(server_round, train_messages, nodes, exchange)
        except SecureSumError as err:
            log(WARNING, "Round %d: the secure sum failed (%s); the global model is kept", server_round, err)
            return TrainRound(None, None, nodes, exchange.train_replies)
        except Exception as err:  # noqa: BLE001  (what the sites sent must not end the run)
            log(ERROR, "Round %d: secure aggregation failed (%s: %s); the global model is kept", server_round, type(err).__name__, err)
            return TrainRound(None, None, nodes, exchange.train_replies)

    def _round(self, server_round: int, train_messages: list[Message], nodes: list[int], exchange: "_Exchange") -> TrainRound:
        share_num = len(nodes)
        if self.share_fraction < 1:
            share_num = max(3, math.ceil(self.share_fraction * len(nodes)))
            share_num = min(len(nodes), share_num + (share_num % 2 == 0))  # SecAgg+'s ring: odd, centred on the node
        threshold = max(2, math.ceil(self.threshold_fraction * share_num))
        if len(nodes) < 2 or threshold > len(nodes):
            raise SecureSumError(f"{len(nodes)} sampled node(s): a secure sum needs at least 2 and the threshold {threshold}")
        setup = SecureSetup(nodes, LABELS, share_num, threshold)
        ranks: dict[int, int] = {}
        for node, record in exchange.ask({n: {wire.STAGE: wire.SETUP, **setup.setup_config()} for n in nodes}).items():
            try:
                keys = {k.split(":", 2)[2]: _bytes(v, 512) for k, v in record.items() if k.startswith(f"pk:{node}:")}
                setup.add_keys(node, keys)
                ranks[node] = _positive_int(record.get("rank"), "rank")
            except (ValueError, TypeError) as err:
                log(WARNING, "Round %d: node %s left out of the secure sum: %s", server_round, node, err)
        keyed = sorted(setup.public_keys)
        for node, record in exchange.ask({n: {wire.STAGE: wire.SHARE_KEYS, **{f"pk:{p}:{k}": v for p, keys in setup.keys_for(n).items()
                                                                         for k, v in keys.items()}} for n in keyed}).items():
            try:
                setup.add_shares(node, {int(k[3:]): _bytes(v, 4096) for k, v in record.items() if k.startswith("ct:")},
                                 {k[7:]: _bytes(v, 32) for k, v in record.items() if k.startswith("commit:")})
            except (ValueError, TypeError) as err:
                log(WARNING, "Round %d: node %s left out of the secure sum: %s", server_round, node, err)
        sharing = setup.sharing
        if len(sharing) < threshold:
            raise SecureSumError(f"{len(sharing)} node(s) shared keys, fewer than the threshold {threshold}")
        global_arrays = self.strategy.state.global_arrays
        extras = ("train-loss",)
        plan = plan_round(global_arrays, [ranks[n] for n in sharing], seed=server_round, weight_bound=self.weight_bound,
                          width=self.sketch_width, value_bound=self.value_bound, extras=extras)
        round_config = {**wire.plan_config(plan), "clients": len(sharing)}
        by_node = {m.metadata.dst_node_id: m for m in train_messages}
        range_sum = setup.secure_sum(RANGE, plan.range_bounds())
        replies = exchange.ask_train({n: (by_node[n].content, {wire.STAGE: wire.RANGE_STAGE, **round_config,
                                                               **{f"ct:{s}": c for s, c in setup.shares_for(n).items()}}) for n in sharing})
        for node, reply in replies.items():
            self._add_masked(server_round, range_sum, node, reply, plan.range_shapes())
        privacy = {n: reply["metrics"] for n, reply in replies.items() if "metrics" in reply.metric_records}
        range_total = self._unmask(server_round, exchange, range_sum, wire.UNMASK_RANGE)
        bases = bases_from_range(plan, range_total)
        bases_record = ArrayRecord({m: Array(np.ascontiguousarray(b)) for m, b in bases.items()})
        corange_sum = setup.secure_sum(CORANGE, plan.corange_bounds())
        # Every site in the first sum must be in the second: the difference of two sums over different sites
        # would be the missing site's sketch (SecureSum.request refuses to unmask such a sum; clients too).
        second = sorted(range_sum.contributors)
        replies = exchange.ask({n: {wire.STAGE: wire.CORANGE_STAGE, "clients": len(sharing)} for n in second},
                               extra={wire.BASES: bases_record}, records=True)
        for node, reply in replies.items():
            self._add_masked(server_round, corange_sum, node, reply, plan.corange_shapes())
        contributors = list(corange_sum.contributors)
        corange_total = self._unmask(server_round, exchange, corange_sum, wire.UNMASK_CORANGE)
        rnd = ServerRound(self.strategy.config, self.strategy.state, log=log)
        metrics = add_to_round(rnd, plan, range_total, bases, corange_total, len(contributors))
        result = rnd.finish()
        if result.arrays is None:
            return TrainRound(None, None, nodes, exchange.train_replies)
        metrics.update(result.metrics)
        # Checked against the run's DP settings where the wrapped strategy's metrics function knows them.
        check = getattr(self.strategy.train_metrics_aggr_fn, "check", lambda record, node: record)
        metrics.update(_privacy_metrics([check(privacy[n], n) for n in contributors if n in privacy]))
        metrics.update({"agg-clients-kept": len(contributors), "agg-clients-dropped": len(nodes) - len(contributors),
                        "secure-bytes-per-client": exchange.bytes_per_node(contributors)})
        if metrics["secure-clipped"]:
            log(WARNING, "Round %d: %d values or weights were clipped to the secure bounds (weight %g, value %g)",
                server_round, int(metrics["secure-clipped"]), self.weight_bound, self.value_bound)
        out = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in result.arrays.items()})
        return TrainRound(out, MetricRecord(metrics), nodes, exchange.train_replies)

    def _add_masked(self, server_round: int, summed: SecureSum, node: int, reply: RecordDict, shapes: list[tuple]) -> None:
        """A site's masked vectors, read only once their names, count, types and sizes match the plan's."""
        try:
            record = reply.array_records.get(wire.MASKED) if wire.MASKED in reply else None
            if not isinstance(record, ArrayRecord) or sorted(record) != sorted(f"v{i}" for i in range(len(shapes))):
                raise ValueError(f"no ArrayRecord '{wire.MASKED}' with the plan's {len(shapes)} vectors")
            masked = []
            for i, shape in enumerate(shapes):
                # Size checked against the plan before anything is allocated (a header may claim any shape).
                array = read_npy(record[f"v{i}"].data, f"v{i}", max_bytes=8 * math.prod(shape) + 1024)
                if array.dtype != np.uint64 or array.shape != tuple(shape):
                    raise ValueError(f"v{i}: {array.dtype} {array.shape}, expected uint64 {tuple(shape)}")
                masked.append(array)
        except Exception as err:  # noqa: BLE001  (any malformed reply is the same refusal)
            log(WARNING, "Round %d: dropping node %s from the secure sum %r: %s", server_round, node, summed.label, err)
            return
        summed.add(node, masked, 0)

    def _unmask(self, server_round: int, exchange: "_Exchange", summed: SecureSum, stage: str) -> list[np.ndarray]:
        survivors, dropped = summed.request()
        if dropped:
            log(INFO, "Round %d: sum %r without node(s) %s (their masks removed with the others' shares)", server_round,
                summed.label, ", ".join(map(str, dropped)))
        answers = exchange.ask({n: {wire.STAGE: stage, "survivors": survivors, "dropped": dropped} for n in survivors})
        shares = {}
        for node, record in answers.items():
            try:
                shares[node] = {int(k[6:]): _bytes(v, 4096) for k, v in record.items() if k.startswith("share:")}
            except (ValueError, TypeError) as err:
                log(WARNING, "Round %d: node %s sent malformed shares: %s", server_round, node, err)
        return summed.unmask(shares)


def _privacy_metrics(records: list[MetricRecord]) -> dict[str, float]:
    """The sites' plaintext ``dp_*`` metrics, reduced as the wire contract says (the worst epsilon: max).

    They are accounting, not data; metrics reduced by a weighted mean would need the weights,
    which stay secret, so none is sent in the clear."""
    combine = {"sum": lambda a, b: a + b, "min": min, "max": max}
    out: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            how = metric_reduction(key)
            if key.startswith("dp_") and how in combine and isinstance(value, (int, float)):
                out[key] = float(value) if key not in out else combine[how](out[key], float(value))
    return out


def _bytes(value, limit: int) -> bytes:
    """A bytes field of a site's reply, at most ``limit`` long (``bytes(10**12)`` would allocate a terabyte)."""
    if not isinstance(value, bytes) or len(value) > limit:
        raise ValueError(f"expected at most {limit} bytes, got {type(value).__name__}")
    return value


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class _Exchange:
    """Sends one stage's messages and collects the valid replies; counts each node's bytes."""

    def __init__(self, grid: Grid, timeout: float | None, server_round: int) -> None:
        self.grid, self.timeout, self.server_round = grid, timeout, server_round
        self.train_replies: list[Message] = []
        self.bytes: dict[int, int] = {}

    def _send(self, contents: dict[int, RecordDict]) -> dict[int, Message]:
        messages = [Message(content=c, message_type=MessageType.TRAIN, dst_node_id=n) for n, c in contents.items()]
        got = {}
        for reply in self.grid.send_and_receive(messages=messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if node in contents:
                got[node] = reply
        for node, content in contents.items():
            self.bytes[node] = self.bytes.get(node, 0) + _nbytes(content) + (_nbytes(got[node].content) if node in got and not got[node].has_error() else 0)
        silent = sorted(set(contents) - set(got))
        if silent:
            log(WARNING, "Round %d: no reply from node(s) %s in a secure stage", self.server_round, ", ".join(map(str, silent)))
        return got

    def ask(self, configs: dict[int, dict], extra: dict | None = None, records: bool = False) -> dict[int, RecordDict | ConfigRecord]:
        """Each node's stage config; the replies' ``secure`` ConfigRecords (whole contents if ``records``)."""
        contents = {n: RecordDict({wire.RECORD: ConfigRecord(c), **(extra or {})}) for n, c in configs.items()}
        out = {}
        for node, reply in self._send(contents).items():
            if reply.has_error():
                log(WARNING, "Round %d: node %s failed a secure stage: %s", self.server_round, node, reply.error.reason)
            elif records:
                out[node] = reply.content
            elif wire.RECORD in reply.content.config_records:
                out[node] = reply.content.config_records[wire.RECORD]
        return out

    def ask_train(self, contents: dict[int, tuple[RecordDict, dict]]) -> dict[int, RecordDict]:
        """The training stage: the wrapped strategy's train content plus the stage config."""
        sent = {n: RecordDict({**dict(content.items()), wire.RECORD: ConfigRecord(c)}) for n, (content, c) in contents.items()}
        got = self._send(sent)
        self.train_replies = list(got.values())
        out = {}
        for node, reply in got.items():
            if reply.has_error():
                log(WARNING, "Round %d: node %s failed to train: %s", self.server_round, node, reply.error.reason)
            else:
                out[node] = reply.content
        return out

    def bytes_per_node(self, nodes: list[int]) -> float:
        return float(np.mean([self.bytes[n] for n in nodes])) if nodes else 0.0


def _nbytes(content: RecordDict) -> int:
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for record in content.config_records.values():
        for key, value in record.items():
            total += len(key) + (len(value) if isinstance(value, (bytes, str)) else 8 * (len(value) if isinstance(value, list) else 1))
    return total
