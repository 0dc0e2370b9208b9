"""L-GreCo: layer-wise adaptive compression of client updates, as a strategy wrapper.

``LGreCo`` wraps any Flower ``Strategy`` the way Flower's
``DifferentialPrivacyServerSideFixedClipping`` does: it forwards the calls and
adds its own step around them. Here the step is: tell clients how to
compress each tensor, decode what they send back into ordinary arrays, and
every few rounds re-choose the per-tensor settings with the L-GreCo
allocator (:func:`fedlowrank.compression.lgreco_allocate`).

Message convention
------------------
Server -> client (``configure_train``), added to the train message's
ConfigRecord (the inner strategy's ``configrecord_key``, ``"config"`` for
FedAvg):

* ``"lgreco.<tensor>" -> "<codec>:<setting>"`` for every tensor of the global
  ArrayRecord (``"powersgd:4"``, ``"topk:0.05"``, ``"qsgd:4"``, ``"none"``);
* ``"lgreco-candidates" -> list[str]``, only in rounds whose tables the
  server will use: the candidate columns the client must measure.

The ArrayRecord the inner strategy sends (the round's global arrays) is
unchanged.

Client -> server (train reply): exactly one ArrayRecord (any key) holding

* the *update* ``local - global`` (global = the arrays received this round)
  plus the client's error-feedback residual, compressed per tensor, for
  every tensor of the global arrays with the global shape, as two uint8
  arrays: ``"lgreco-spec"`` (one ASCII line
  ``"<codec>:<setting>|<shape>|<opts>"`` per tensor, sorted names) and
  ``"lgreco-payload"`` (every tensor's codec fields as one byte stream);
* when candidates were sent: ``"lgreco-errors"`` (float16 ratios to
  ``||update + residual||^2``, ``(num_tensors, num_candidates)``, columns in
  the order of ``"lgreco-candidates"``) and ``"lgreco-energy"`` (float32,
  ``(num_tensors, 2)``: ``||update||^2``, ``||update + residual||^2``), rows in
  sorted tensor-name order. No size table: the server computes every
  candidate's encoded size from the global shapes
  (:func:`fedlowrank.compression.size_table`);

plus the MetricRecord the inner strategy expects (e.g. ``"num-examples"``).
:func:`fedlowrank.compression.encode_update` produces exactly these arrays.

Server side (``aggregate_train``): each reply is decoded
(:func:`fedlowrank.compression.decode_update`), the delta is added to the
global arrays sent this round, and the reply is handed to the inner strategy
as a plain ArrayRecord of the reconstructed arrays (same key, same metrics),
so FedAvg or ``FedLowRank`` aggregate as if nothing had been compressed. A
reply that fails to decode (a setting or shape other than the server asked
for, an unknown codec, wrong lengths or values, a spec for another number of
tensors) is dropped with a logged reason; the round goes on with the others.

A client whose adapter rank is below the global rank sends its update
relative to the head it loaded (its best approximation of the global adapter
at its rank, :func:`fedlowrank.adapters.state.fit_arrays_to_ranks`), in its
own factor shapes; the server forms the same head from the arrays it sent and
adds the decoded delta to it, so mixed ranks work under compression. The
allocator's size table assumes the global shapes (an upper bound for them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlowrank.adapters import is_fold_key, split_factor_key
from fedlowrank.adapters.state import factor_ranks, fit_arrays_to_ranks

from .replies import default_reply_bytes, read_array
from fedlowrank.compression import (
    CANDIDATES_KEY,
    ENERGY_KEY,
    ERRORS_KEY,
    PAYLOAD_KEY,
    SPEC_KEY,
    DEFAULT_NUM_BINS,
    candidate_key,
    decode_update,
    feedback_errors,
    allocate_or_uniform,
    lgreco_allocate,
    read_tables,
    settings_to_config,
    size_table,
    table_rows,
)

# The grid benchmarks/communication.py measures. No Top-K below 5%: under
# error feedback such a setting defers nearly all of a tensor's update, and its
# residual grows round after round.
DEFAULT_CANDIDATES = (
    "none",
    *(f"powersgd:{k}" for k in (1, 2, 3, 4)),
    *(f"topk:{d}" for d in (0.05, 0.1, 0.2, 0.3)),
    *(f"qsgd:{b}" for b in (2, 3, 4, 6, 8)),
    *(f"sq:{b}" for b in (1, 2, 3, 4)),
)


UPDATE_KEYS = (SPEC_KEY, PAYLOAD_KEY, ERRORS_KEY, ENERGY_KEY)
"""Everything a compressed reply's ArrayRecord may hold."""


def payload_bytes(array: Array) -> int:
    """Bytes of an array's values (what the codecs count), without trusting its header:
    a header that does not match its data counts as the bytes that travelled."""
    try:
        return int(read_array(array, "array").nbytes)
    except ValueError:
        return len(array.data) if isinstance(array, Array) else 0


def pooled(tables: list[np.ndarray]) -> np.ndarray:
    """The clients' tables pooled cell by cell: the mean of one or two, the median of more.

    A table is a client's claim about its own update; with three or more clients the
    median stays within the honest clients' range whatever one client claims.
    """
    stack = np.stack(tables)
    return np.median(stack, axis=0) if len(tables) >= 3 else stack.mean(axis=0)


def lower_rank_factor(base: dict[str, np.ndarray]):
    """Accept, for adapter factors only, a declared shape of lower rank than the global's."""

    def accept(name: str, shape: tuple[int, ...]) -> bool:
        if split_factor_key(name) is None or len(shape) != 2:
            return False
        rows, cols = np.shape(base[name])
        return shape[0] == rows and 1 <= shape[1] < cols

    return accept


class LGreCo(Strategy):
    """Strategy wrapper for layer-wise adaptive compression of client updates.

    Parameters
    ----------
    strategy : Strategy
        The strategy that aggregates the decoded (reconstructed) arrays,
        e.g. ``FedAvg`` or ``FedLowRank``.
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

    Examples
    --------
    Wrap a strategy::

        strategy = LGreCo(FedAvg(), default="powersgd:4", alpha=1.0)

    and on the client encode the update with
    :func:`fedlowrank.compression.encode_update`.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        strategy: Strategy,
        candidates: Sequence[str | tuple] = DEFAULT_CANDIDATES,
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
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.candidates = [candidate_key(c) for c in candidates]
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be non-empty and distinct, got {self.candidates}.")
        self.default = candidate_key(default)
        if self.default not in self.candidates:
            raise ValueError(f"default {self.default!r} must be one of the candidates {self.candidates}.")
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}.")
        if warmup_rounds < 0 or reallocate_every < 1 or num_bins < 1 or max_interval_factor < 1:
            raise ValueError("Need warmup_rounds >= 0, reallocate_every >= 1, num_bins >= 1, max_interval_factor >= 1.")
        self.alpha = float(alpha)
        self.warmup_rounds = int(warmup_rounds)
        self.reallocate_every = int(reallocate_every)
        self.num_bins = int(num_bins)
        if error_model not in ("feedback", "oneshot"):
            raise ValueError(f"error_model must be 'feedback' or 'oneshot', got {error_model!r}.")
        self.error_model = error_model
        if budget_anchor not in ("warmup", "current"):
            raise ValueError(f"budget_anchor must be 'warmup' or 'current', got {budget_anchor!r}.")
        self.budget_anchor = budget_anchor
        # Per tensor: the default's error per unit of energy, from the first allocation.
        self._default_ratio: dict[str, float] | None = None
        self.codec_options = {k: dict(v) for k, v in (codec_options or {}).items()}
        self.fallback_to_uniform = bool(fallback_to_uniform)
        # Whether the last allocation round got no tables (then ask again).
        # It changes only at the end of aggregate_train, so tables_wanted()
        # answers the same in configure_train and aggregate_train of a round.
        self._retry_allocation = False
        # The schedule: allocations at anchor + k * interval (k >= 0). Both
        # move only at the end of aggregate_train, like _retry_allocation.
        self.max_interval = int(max_interval_factor) * self.reallocate_every
        self._interval = self.reallocate_every
        self._anchor = max(1, self.warmup_rounds)
        self.allocation_details: dict[int, dict] = {}
        # Set when a uniform candidate within budget beat the allocation plus its tables:
        # the settings stay uniform and no more tables are asked for.
        self.uniform_fallback: str | None = None
        self.settings: dict[str, str] = {}
        self.current_arrays = ArrayRecord()
        self.bytes_history: dict[int, dict[int, int]] = {}
        self.allocation_history: dict[int, dict[str, str]] = {}

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything LGreCo carries across rounds, plus its inner strategy's (prefixed ``inner/``).

        Settings, the allocation schedule (anchor, interval, retry), the budget anchor,
        and the allocation and byte histories, as JSON in a uint8 array.
        """
        state = {
            "settings": self.settings,
            "retry_allocation": self._retry_allocation,
            "interval": self._interval,
            "anchor": self._anchor,
            "default_ratio": self._default_ratio,
            "uniform_fallback": self.uniform_fallback,
            "allocation_history": {str(k): v for k, v in self.allocation_history.items()},
            "allocation_details": {str(k): v for k, v in self.allocation_details.items()},
            "bytes_history": {str(k): {str(n): b for n, b in v.items()} for k, v in self.bytes_history.items()},
        }
        out = {"lgreco": np.frombuffer(json.dumps(state).encode(), dtype=np.uint8).copy()}
        if hasattr(self.strategy, "state_dict"):
            out.update({f"inner/{k}": v for k, v in self.strategy.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` (the inner strategy's too)."""
        data = json.loads(bytes(np.asarray(state["lgreco"], dtype=np.uint8)).decode())
        self.settings = dict(data["settings"])
        self._retry_allocation = bool(data["retry_allocation"])
        self._interval, self._anchor = int(data["interval"]), int(data["anchor"])
        self._default_ratio = data["default_ratio"]
        self.uniform_fallback = data.get("uniform_fallback")
        self.allocation_history = {int(k): v for k, v in data["allocation_history"].items()}
        self.allocation_details = {int(k): v for k, v in data["allocation_details"].items()}
        self.bytes_history = {int(k): {int(n): b for n, b in v.items()} for k, v in data["bytes_history"].items()}
        inner = {k[len("inner/"):]: v for k, v in state.items() if k.startswith("inner/")}
        if hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict(inner)

    def __repr__(self) -> str:
        """Compute a string representation of the strategy."""
        return f"LGreCo(default={self.default!r}, alpha={self.alpha}) wrapping {self.strategy!r}"

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> L-GreCo settings:")
        log(INFO, "\t│\t├── Candidates: %s", self.candidates)
        log(INFO, "\t│\t├── Default: %s, alpha: %s", self.default, self.alpha)
        log(INFO, "\t│\t├── Error model: %s, budget anchored at: %s", self.error_model, self.budget_anchor)
        log(
            INFO,
            "\t│\t└── Warm-up: %s, reallocate every: %s (up to %s while unchanged)",
            self.warmup_rounds,
            self.reallocate_every,
            self.max_interval,
        )
        self.strategy.summary()

    # -- schedule -----------------------------------------------------------
    def tables_wanted(self, server_round: int) -> bool:
        """Whether this round's tables feed an allocation (and are asked for).

        On the schedule (``anchor + k * interval``; the interval grows while
        allocations leave the settings unchanged), or in any round after an
        allocation round that received no usable tables.
        """
        if self.uniform_fallback is not None:
            return False
        first = max(1, self.warmup_rounds)
        if server_round >= first and self._retry_allocation:
            return True
        return server_round >= self._anchor and (server_round - self._anchor) % self._interval == 0

    @property
    def interval(self) -> int:
        """Rounds from the last scheduled allocation to the next one."""
        return self._interval

    def _advance_schedule(self, server_round: int, changed: bool | None) -> None:
        """Move the schedule past ``server_round`` after an allocation attempt.

        ``changed`` is whether the allocation changed the settings (``None``:
        it failed, keep the interval). The anchor becomes the schedule point
        this allocation belonged to (a retried allocation keeps the original
        grid), then the next allocation is one (new) interval after it.
        """
        self._anchor += (server_round - self._anchor) // self._interval * self._interval
        if changed is True:
            self._interval = self.reallocate_every
        elif changed is False:
            self._interval = min(2 * self._interval, self.max_interval)

    # -- training -----------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training, adding per-tensor settings."""
        self.current_arrays = arrays
        # New tensors start at the default; vanished ones are forgotten.
        # Fold factors (residual mode "fold") only travel to clients: no setting, no update.
        self.settings = {k: self.settings.get(k, self.default) for k in arrays.keys() if not is_fold_key(k)}
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        wanted = self.candidates if self.tables_wanted(server_round) else None
        entries = settings_to_config(self.settings, wanted)
        for message in messages:
            record = self._config_record(message.content)
            # The same ConfigRecord object may be reused across rounds.
            record.pop(CANDIDATES_KEY, None)
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

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode replies, aggregate them with the inner strategy, re-allocate."""
        base = {k: v.numpy() for k, v in self.current_arrays.items() if not is_fold_key(k)}
        decoded: list[Message] = []
        tables: list[tuple[np.ndarray, np.ndarray]] = []
        table_bytes: list[int] = []
        node_ids: list[int] = []
        nbytes: list[int] = []
        serialized: list[int] = []
        dropped = 0
        for reply in replies:
            if reply.has_error():
                decoded.append(reply)  # the inner strategy logs and skips it
                continue
            node = int(reply.metadata.src_node_id)
            try:
                record_key, record = self._single_array_record(reply.content)
                # Count first: a reply that fails to decode still travelled.
                node_ids.append(node)
                nbytes.append(sum(payload_bytes(a) for a in record.values()))
                serialized.append(sum(len(a.data) for a in record.values() if isinstance(a, Array)))
                limit = default_reply_bytes(base)
                if sum(len(a.data) for a in record.values() if isinstance(a, Array)) > limit:
                    raise ValueError(f"reply holds more than the {limit} bytes allowed")
                unknown = sorted(set(record.keys()) - set(UPDATE_KEYS))
                if unknown:
                    raise ValueError(f"unexpected arrays {unknown[:5]} in a compressed reply")
                payload = {k: read_array(a, k, limit) for k, a in record.items()}
                decoded.append(self._reconstructed_reply(reply, record_key, payload, base, self.settings))
            except Exception as err:  # noqa: BLE001  (no reply may crash the round)
                dropped += 1
                log(WARNING, "LGreCo: dropping reply from node %s in round %s: %s", node, server_round, err)
                continue
            table = self._reply_tables(payload, node)
            if table is not None:
                tables.append(table)
                table_bytes.append(sum(payload_bytes(record[k]) for k in (ERRORS_KEY, ENERGY_KEY) if k in record))

        self.bytes_history[server_round] = dict(zip(node_ids, nbytes))
        arrays, metrics = self.strategy.aggregate_train(server_round, decoded)
        metrics = self._with_byte_metrics(metrics, node_ids, nbytes, serialized, dropped)
        if self.tables_wanted(server_round):
            self._reallocate(server_round, tables, float(np.mean(table_bytes)) if table_bytes else 0.0)
        return arrays, metrics

    @staticmethod
    def _single_array_record(content: RecordDict) -> tuple[str, ArrayRecord]:
        if len(content.array_records) != 1:
            raise ValueError(f"expected one ArrayRecord, got {len(content.array_records)}")
        return next(iter(content.array_records.items()))

    def _reconstructed_reply(
        self,
        reply: Message,
        record_key: str,
        payload: dict[str, np.ndarray],
        base: dict[str, np.ndarray],
        settings: dict[str, str],
    ) -> Message:
        """A copy of ``reply`` whose ArrayRecord holds ``reference + decoded delta``.

        The reference is the global arrays, or for a client of lower rank the head it
        loaded (its factor shapes declare its rank).
        """
        delta = decode_update(
            payload, {k: v.shape for k, v in base.items()}, settings, lower_rank_factor(base), self.codec_options
        )
        ranks = {m: r for m, r in factor_ranks(delta).items() if r < base[f"{m}.lora_U"].shape[1]}
        reference = base
        if ranks:
            truncation = getattr(getattr(self.strategy, "rule", None), "truncation", "svd")
            shares = self.strategy.group_shares() if hasattr(self.strategy, "group_shares") else None
            reference = fit_arrays_to_ranks(base, ranks, truncation, shares)
        arrays = {}
        for name, ref in reference.items():
            if np.shape(ref) != np.shape(delta[name]):
                raise ValueError(f"tensor {name!r}: update of shape {np.shape(delta[name])} for rank-fitted {np.shape(ref)}")
            arrays[name] = Array(np.asarray(np.asarray(ref, dtype=np.float64) + delta[name]).astype(base[name].dtype))
        content = RecordDict({record_key: ArrayRecord(arrays)})
        for key, rec in reply.content.metric_records.items():
            content[key] = rec
        for key, rec in reply.content.config_records.items():
            content[key] = rec
        # Same metadata: the inner strategy sees the same sender and round.
        return Message(content=content, metadata=reply.metadata)

    def _reply_tables(self, payload: dict[str, np.ndarray], node: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The reply's (errors, energy), or None (a bad table costs the table, not the update)."""
        try:
            return read_tables(payload, len(self.settings), len(self.candidates))
        except ValueError as err:
            log(WARNING, "LGreCo: ignoring error tables from node %s: %s", node, err)
            return None

    def _with_byte_metrics(
        self,
        metrics: MetricRecord | None,
        node_ids: list[int],
        nbytes: list[int],
        serialized: list[int],
        dropped: int,
    ) -> MetricRecord | None:
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

    # -- allocation ---------------------------------------------------------
    def _reallocate(self, server_round: int, tables: list[tuple[np.ndarray, np.ndarray]], table_bytes: float = 0.0) -> None:
        """Average the clients' tables and re-choose every tensor's setting.

        Never worse than a uniform candidate: if one within budget sends fewer bytes
        than the allocation plus its tables (one client's table bytes spread over the
        rounds until the next allocation, ``reallocate_every``), every tensor gets it and
        no more tables are asked for (:func:`fedlowrank.compression.allocate_or_uniform`).

        Tables are pooled without weights: they describe how compressible
        each tensor's update is, not how much a client counts (:func:`pooled`:
        the per-cell median from three tables on, so one poisoned table cannot
        steer the allocation). Under the
        "feedback" error model each client's table is turned into settled
        errors before averaging, because each client runs its own error
        feedback. Sizes come from the global shapes, not from the clients.
        """
        if not tables:
            log(INFO, "LGreCo: no error tables in round %s; keeping the settings, asking again.", server_round)
            self._retry_allocation = True
            return
        self._retry_allocation = False
        measured = pooled([t[0] for t in tables])
        if self.error_model == "feedback":
            errors = pooled([feedback_errors(e, en) for e, en in tables])
        else:
            errors = measured
        rows = table_rows(self.settings)
        shapes = {name: tuple(self.current_arrays[name].shape) for name in rows}
        sizes = size_table(shapes, self.candidates, self.codec_options)
        default = self.candidates.index(self.default)
        # Settled errors scale with ||u||^2, one-shot errors with ||u + residual||^2.
        energy = pooled([t[1][:, 0 if self.error_model == "feedback" else 1] for t in tables])
        reference = self._reference_errors(rows, errors[:, default], energy)
        budget = self.alpha * float(reference.sum())
        try:
            if self.fallback_to_uniform:
                choice, uniform = allocate_or_uniform(
                    errors, sizes, budget, table_cost=table_bytes / self.reallocate_every, num_bins=self.num_bins
                )
            else:
                choice, uniform = lgreco_allocate(errors, sizes, budget, num_bins=self.num_bins), None
        except ValueError as err:
            log(WARNING, "LGreCo: allocation failed in round %s (%s); keeping the current settings.", server_round, err)
            self._advance_schedule(server_round, None)
            return
        previous = dict(self.settings)
        self.settings = {name: self.candidates[c] for name, c in zip(rows, choice)}
        if uniform is not None:
            self.uniform_fallback = self.candidates[uniform]
            log(
                INFO,
                "LGreCo: round %s: uniform %s (%.0f B per client) is within budget and cheaper than a per-tensor "
                "allocation plus its tables (%.0f B of tables every %d rounds): using it, no more tables.",
                server_round, self.uniform_fallback, sizes[:, uniform].sum(), table_bytes, self.reallocate_every,
            )
        self._advance_schedule(server_round, self.settings != previous)
        self.allocation_history[server_round] = dict(self.settings)
        picked = np.arange(len(rows)), choice
        self.allocation_details[server_round] = {
            "tables": len(tables),
            "size_ratio": float(sizes[picked].sum() / sizes[:, default].sum()),
            # Estimated error vs the uniform default, in the budgeted model
            # and as measured this round (one-shot).
            "error_ratio": float(errors[picked].sum() / max(reference.sum(), 1e-300)),
            "measured_error_ratio": float(measured[picked].sum() / max(measured[:, default].sum(), 1e-300)),
            "changed": self.settings != previous,
            "next_allocation": self._anchor + self._interval,
            "uniform_fallback": self.uniform_fallback,
            "table_bytes_per_client": table_bytes,
        }
        log(
            INFO,
            "LGreCo: round %s allocation from %d tables: %.0f bytes (uniform %s: %.0f), error %.4g <= %.4g",
            server_round,
            len(tables),
            sizes[picked].sum(),
            self.default,
            sizes[:, default].sum(),
            errors[picked].sum(),
            budget,
        )

    def _reference_errors(self, rows: list[str], current: np.ndarray, energy: np.ndarray) -> np.ndarray:
        """Per tensor, the uniform default's error the budget is taken from.

        ``current`` is the default's column of this round's (averaged)
        tables and ``energy`` the energy it scales with. Under
        ``budget_anchor="warmup"`` the first call stores ``current / energy``
        per tensor; later calls return that ratio times this round's energy
        (tensors seen for the first time use ``current``).
        """
        if self.budget_anchor == "current":
            return current
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(energy > 0, current / np.where(energy > 0, energy, 1.0), 0.0)
        if self._default_ratio is None:
            self._default_ratio = dict(zip(rows, ratio.tolist()))
        anchored = np.array([self._default_ratio.get(name, np.nan) for name in rows])
        return np.where(np.isnan(anchored), current, anchored * energy)

    # -- evaluation: unchanged ---------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated evaluation."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate MetricRecords in the received Messages."""
        return self.strategy.aggregate_evaluate(server_round, replies)
