"""L-GreCo: layer-wise adaptive compression of client updates, as a strategy wrapper.

``LGreCo`` wraps any Flower ``Strategy`` the way Flower's
``DifferentialPrivacyServerSideFixedClipping`` does: it forwards the calls and adds its
own step around them: tell clients how to compress each tensor, decode what they send
back, and every few rounds re-choose the per-tensor settings. The decisions live in the
core's :class:`fedlowrank.compression.controller.LGreCoController` (one state object);
this module is message handling.

Messages. Server -> client: the train ConfigRecord (the inner strategy's
``configrecord_key``) gains ``"lgreco.<tensor>" -> "<codec>:<setting>"`` for every tensor
sent, and ``"lgreco-candidates"`` in rounds whose tables the server will use. Client ->
server: one ArrayRecord with ``"lgreco-spec"`` and ``"lgreco-payload"`` (the update
``local - global`` plus the client's error-feedback residual, compressed per tensor), and
in table rounds ``"lgreco-errors"`` and ``"lgreco-energy"``, plus the MetricRecord the inner
strategy expects; :func:`fedlowrank.compression.encode_update` writes exactly these
(formats: :mod:`fedlowrank.compression.update`). A client of lower adapter rank sends its
update relative to the head it loaded, in its own factor shapes; the server forms the
same head.

Each reply is decoded once, and its arrays go to the inner strategy: through
``add_arrays`` for ``FedLowRank`` and ``FairLoRA``, or as a reconstructed message for any
other strategy (``FedAvg``), so it aggregates as if nothing had been compressed. A reply
that fails to decode is dropped with a logged reason, and the round goes on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlowrank.compression import CANDIDATES_KEY, DEFAULT_NUM_BINS, ENERGY_KEY, ERRORS_KEY, read_tables, settings_to_config
from fedlowrank.compression.controller import DEFAULT_CANDIDATES, LGreCoConfig, LGreCoController
from fedlowrank.wire import is_fold_key

from .replies import check_records, compressed_payload, default_reply_bytes, payload_bytes, single_array_record

class LGreCo(Strategy):
    """Strategy wrapper for layer-wise adaptive compression of client updates.

    Parameters
    ----------
    strategy : Strategy
        The strategy that aggregates the decoded arrays, e.g. ``FedAvg`` or ``FedLowRank``.
    candidates, default, alpha, warmup_rounds, reallocate_every, num_bins, error_model, fallback_to_uniform, codec_options, max_interval_factor, budget_anchor, allocate
        What L-GreCo does: :class:`fedlowrank.compression.controller.LGreCoConfig`
        (documented there, kept as ``self.config``).

    Examples
    --------
    Wrap a strategy::

        strategy = LGreCo(FedAvg(), default="powersgd:4", alpha=1.0)

    and on the client encode the update with
    :func:`fedlowrank.compression.encode_update`.
    """

    def __init__(
        self,
        strategy: Strategy,
        candidates: Sequence[str | tuple] | None = None,
        default: str | tuple = "powersgd:4",
        alpha: float = 1.0,
        warmup_rounds: int = 1,
        reallocate_every: int = 5,
        num_bins: int = DEFAULT_NUM_BINS,
        error_model: str = "feedback",
        fallback_to_uniform: bool = True,
        codec_options: dict | None = None,
        max_interval_factor: int = 4,
        budget_anchor: str = "current",
        allocate: bool = True,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        if candidates is None:
            candidates = DEFAULT_CANDIDATES if allocate else [default]
        self.config = LGreCoConfig(candidates, default, alpha, warmup_rounds, reallocate_every, num_bins, error_model,
                                   fallback_to_uniform, codec_options, max_interval_factor, budget_anchor, allocate)
        self.controller = LGreCoController(self.config, log=log)
        self.current_arrays = ArrayRecord()

    # The controller's state, read where tests, benchmarks and reports look for it.
    candidates = property(lambda self: self.config.candidates)
    default = property(lambda self: self.config.default)
    interval = property(lambda self: self.controller.state.interval, doc="Rounds from the last scheduled allocation to the next.")
    uniform_fallback = property(lambda self: self.controller.state.uniform_fallback)
    allocation_history = property(lambda self: self.controller.state.allocation_history)
    allocation_details = property(lambda self: self.controller.state.allocation_details)
    bytes_history = property(lambda self: self.controller.state.bytes_history)

    @property
    def settings(self) -> dict[str, str]:
        """Per tensor, the setting clients use this round."""
        return self.controller.state.settings

    @settings.setter
    def settings(self, value: dict[str, str]) -> None:
        self.controller.state.settings = dict(value)

    def tables_wanted(self, server_round: int) -> bool:
        """Whether this round's tables feed an allocation (and are asked for)."""
        return self.controller.tables_wanted(server_round)

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """The controller's state (``"lgreco"``) and the inner strategy's (prefixed ``inner/``)."""
        out = self.controller.state.state_dict()
        if hasattr(self.strategy, "state_dict"):
            out.update({f"inner/{k}": v for k, v in self.strategy.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` (the inner strategy's too)."""
        self.controller.state.load_state_dict(state)
        if hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict({k[len("inner/"):]: v for k, v in state.items() if k.startswith("inner/")})

    def __repr__(self) -> str:
        return f"LGreCo(default={self.default!r}, alpha={self.config.alpha}) wrapping {self.strategy!r}"

    def summary(self) -> None:
        """Log the configuration, then the inner strategy's."""
        c = self.config
        log(INFO, "\t├──> L-GreCo settings:")
        if not c.allocate:
            log(INFO, "\t│\t└── Uniform: %s for every tensor", c.default)
        else:
            log(INFO, "\t│\t├── Candidates: %s", c.candidates)
            log(INFO, "\t│\t├── Default: %s, alpha: %s", c.default, c.alpha)
            log(INFO, "\t│\t├── Error model: %s, budget anchored at: %s", c.error_model, c.budget_anchor)
            log(INFO, "\t│\t└── Warm-up: %s, reallocate every: %s (up to %s while unchanged)",
                c.warmup_rounds, c.reallocate_every, c.max_interval)
        self.strategy.summary()

    # -- training -----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The inner strategy's train messages, with per-tensor settings in their config."""
        self.current_arrays = arrays
        # Fold factors (residual mode "fold") only travel to clients: no setting, no update.
        settings = self.controller.begin_round([k for k in arrays.keys() if not is_fold_key(k)])
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        entries = settings_to_config(settings, self.candidates if self.tables_wanted(server_round) else None)
        for message in messages:
            record = self._config_record(message.content)
            record.pop(CANDIDATES_KEY, None)  # the same ConfigRecord object may be reused across rounds
            record.update(entries)
        return messages

    def _config_record(self, content: RecordDict) -> ConfigRecord:
        """The message's ConfigRecord (created if it has none)."""
        key = getattr(self.strategy, "configrecord_key", "config")
        records = content.config_records
        if key in records:
            return records[key]
        if len(records) == 1:
            return next(iter(records.values()))
        content[key] = ConfigRecord()
        return content[key]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode each reply once, aggregate with the inner strategy, re-allocate on the schedule."""
        base = {k: v.numpy() for k, v in self.current_arrays.items() if not is_fold_key(k)}
        limit = default_reply_bytes(base)
        truncation = getattr(getattr(self.strategy, "rule", None), "truncation", "svd")
        shares = self.strategy.group_shares() if hasattr(self.strategy, "group_shares") else None
        decoded: list[tuple[Message, dict[str, np.ndarray] | None]] = []
        tables, table_bytes, node_ids, nbytes, serialized, dropped = [], [], [], [], [], 0
        for reply in replies:
            if reply.has_error():
                decoded.append((reply, None))  # the inner strategy logs and skips it
                continue
            node = int(reply.metadata.src_node_id)
            try:
                check_records(reply.content)  # before anything is decoded
                record = single_array_record(reply.content)
                # Count first: a reply that fails to decode still travelled.
                node_ids.append(node)
                nbytes.append(sum(payload_bytes(a) for a in record.values()))
                serialized.append(sum(len(a.data) for a in record.values() if isinstance(a, Array)))
                payload = compressed_payload(record, limit)
                decoded.append((reply, self.controller.decode(payload, base, truncation, shares)))
            except Exception as err:  # noqa: BLE001  (no reply may crash the round)
                dropped += 1
                log(WARNING, "LGreCo: dropping reply from node %s in round %s: %s", node, server_round, err)
                continue
            try:
                table = read_tables(payload, len(self.settings), len(self.candidates))
            except ValueError as err:  # a bad table costs the table, not the update
                log(WARNING, "LGreCo: ignoring error tables from node %s: %s", node, err)
                table = None
            if table is not None:
                tables.append(table)
                table_bytes.append(sum(payload_bytes(record[k]) for k in (ERRORS_KEY, ENERGY_KEY) if k in record))
        self.controller.state.bytes_history[server_round] = dict(zip(node_ids, nbytes))
        arrays, metrics = self._inner_aggregate(server_round, decoded)
        metrics = self._with_byte_metrics(metrics, node_ids, nbytes, serialized, dropped)
        shapes = {name: tuple(a.shape) for name, a in self.current_arrays.items()}
        self.controller.end_round(server_round, tables, shapes, float(np.mean(table_bytes)) if table_bytes else 0.0)
        return arrays, metrics

    def _inner_aggregate(self, server_round: int, decoded: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the decoded arrays to the inner strategy: directly where it takes them, else as messages."""
        if hasattr(self.strategy, "aggregate_arrays"):
            return self.strategy.aggregate_arrays(server_round, decoded)
        messages = []
        for reply, arrays in decoded:
            if arrays is not None:
                key = next(iter(reply.content.array_records))
                content = RecordDict({key: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                      **reply.content.metric_records, **reply.content.config_records})
                reply = Message(content=content, metadata=reply.metadata)  # same sender and round
            messages.append(reply)
        return self.strategy.aggregate_train(server_round, messages)

    def _with_byte_metrics(self, metrics: MetricRecord | None, node_ids: list[int], nbytes: list[int],
                           serialized: list[int], dropped: int) -> MetricRecord | None:
        """Add the bytes that travelled to the aggregated metrics."""
        if not node_ids and metrics is None:
            return None
        metrics = MetricRecord() if metrics is None else metrics
        raw = 4 * sum(int(np.prod(a.shape)) for k, a in self.current_arrays.items() if not is_fold_key(k))
        metrics["lgreco-bytes"] = int(sum(nbytes))
        metrics["lgreco-bytes-per-client"] = [int(b) for b in nbytes]
        metrics["lgreco-node-ids"] = [int(n) for n in node_ids]
        metrics["lgreco-serialized-bytes"] = int(sum(serialized))
        metrics["lgreco-raw-bytes"] = int(raw * len(node_ids))
        metrics["lgreco-dropped"] = int(dropped)
        return metrics

    # -- evaluation: the inner strategy's -----------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Configure the next round of federated evaluation."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate MetricRecords in the received Messages."""
        return self.strategy.aggregate_evaluate(server_round, replies)
