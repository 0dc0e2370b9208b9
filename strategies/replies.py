"""Per-reply checks shared by our strategies: a bad reply is named, logged and dropped.

Flower's own consistency check rejects the whole round when one reply is malformed;
a federation of hospitals should lose one site's update, not the round. Everything a
client controls is checked before anything is allocated from it: the reply's total
bytes against a limit, each array's ``.npy`` header (dtype, declared shape) against
its data length and the global model, weights and counts against a cap.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Mapping
from logging import WARNING

import numpy as np
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from fedlowrank.aggregation.validate import MAX_WEIGHT, check_declared_weight, check_weight, finite_number  # noqa: F401  (re-exported)
from fedlowrank.compression import ENERGY_KEY, ERRORS_KEY, PAYLOAD_KEY, SPEC_KEY
from fedlowrank.wire import (MAX_RECORD_BYTES, MAX_RECORD_KEYS, REPLY_NODE_KEY, SERVER_METRICS, UNIT_INTERVAL_METRICS,
                            metric_reduction)

NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: what a model's arrays are made of


def read_array(array: Array, name: str, max_bytes: int | None = None) -> np.ndarray:
    """The array's values, refused before allocation unless it is a plain numeric ``.npy``.

    Parses the ``.npy`` header itself: the dtype must be bool/int/uint/float (no object,
    string, void or structured data), and the declared shape must match the data length
    exactly (a 150-byte header cannot declare a terabyte). Returns a read-only view.

    Raises
    ------
    ValueError
        Naming ``name`` and what is wrong.
    """
    if not isinstance(array, Array):
        raise ValueError(f"'{name}' is a {type(array).__name__}, not an Array")
    if array.stype != "numpy.ndarray":
        raise ValueError(f"'{name}' has serialisation type {array.stype!r}, expected 'numpy.ndarray'")
    return read_npy(array.data, name, max_bytes)


def read_npy(data: bytes, name: str, max_bytes: int | None = None) -> np.ndarray:
    """:func:`read_array` for the bytes of one ``.npy`` file (e.g. a member of a checkpoint's ``.npz``)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"'{name}' holds {len(data)} bytes, more than the {max_bytes} allowed")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as err:  # noqa: BLE001  (any malformed header is one reason to refuse)
        raise ValueError(f"'{name}' is not a valid .npy array: {err}") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"'{name}' has dtype {dtype!r}; only bool, integer and float arrays are accepted")
    if any(d < 0 for d in shape):  # (-2, -8) has the product of (2, 8): caught here, not by numpy's reshape
        raise ValueError(f"'{name}' declares shape {shape} with a negative dimension")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data) - stream.tell():
        raise ValueError(
            f"'{name}' declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
            f"but carries {len(data) - stream.tell()}"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return values.reshape(shape, order="F" if fortran else "C")


def check_records(content: RecordDict) -> None:
    """Refuse a reply whose metric and config records exceed :data:`~fedlowrank.wire.MAX_RECORD_KEYS`
    keys or :data:`~fedlowrank.wire.MAX_RECORD_BYTES` bytes; the keys are counted before any value is read."""
    records = [*content.metric_records.values(), *content.config_records.values()]
    keys = sum(len(record) for record in records)
    if keys > MAX_RECORD_KEYS:
        raise ValueError(f"reply carries {keys} metric and config keys, more than the {MAX_RECORD_KEYS} allowed")
    size = sum(len(key) + _value_bytes(value) for record in records for key, value in record.items())
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"reply's metric and config records hold {size} bytes, more than the {MAX_RECORD_BYTES} allowed")


def _value_bytes(value) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, list):  # homogeneous in Flower's records: numbers cost 8 bytes each, read in O(1)
        return sum(len(v) for v in value) if value and isinstance(value[0], (str, bytes)) else 8 * len(value)
    return 8


def reply_metrics(content: RecordDict) -> MetricRecord:
    """The reply's one MetricRecord."""
    if len(content.metric_records) != 1:
        raise ValueError(f"expected one MetricRecord, got {len(content.metric_records)}")
    return next(iter(content.metric_records.values()))


def claimed_metrics(msg: Message) -> MetricRecord | dict:
    """A reply's one MetricRecord as it came, or ``{}`` where it has none or several (to read a
    claim from, e.g. why a run kept nothing; never to aggregate)."""
    try:
        return reply_metrics(msg.content)
    except ValueError:
        return {}


def reply_weight(content: RecordDict, weighted_by_key: str, max_weight: float = MAX_WEIGHT) -> float:
    """The reply's aggregation weight; ``ValueError`` if missing, negative, not finite or above the cap."""
    metrics = reply_metrics(content)
    if weighted_by_key not in metrics:
        raise ValueError(f"MetricRecord lacks the weight key '{weighted_by_key}'")
    return check_weight(metrics[weighted_by_key], f"weight '{weighted_by_key}'", max_weight)


def reply_arrays(content: RecordDict, expected_keys: Iterable[str], max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The reply's arrays as read-only numpy views, each ``.npy`` header checked before use.

    ``max_bytes`` bounds the reply's total array bytes, checked before any array is read.
    Shapes, ranks and values are checked against the global arrays by the server round
    (:func:`fedlowrank.aggregation.validate.check_reply_arrays`).
    """
    record = single_array_record(content)
    expected_keys = list(expected_keys)
    if set(record.keys()) != set(expected_keys):
        missing = sorted(set(expected_keys) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(expected_keys))
        raise ValueError(f"array keys differ from the global model: missing {missing}, unexpected {extra[:10]}")
    if max_bytes is not None:
        total = sum(len(a.data) for a in record.values() if isinstance(a, Array))
        if total > max_bytes:
            raise ValueError(f"reply holds {total} bytes of arrays, more than the {max_bytes} allowed")
    return {key: read_array(record[key], key, max_bytes) for key in expected_keys}


def single_array_record(content: RecordDict):
    """The reply's one ArrayRecord; ``ValueError`` for none or several."""
    if len(content.array_records) != 1:
        raise ValueError(f"expected one ArrayRecord, got {len(content.array_records)}")
    return next(iter(content.array_records.values()))


UPDATE_KEYS = (SPEC_KEY, PAYLOAD_KEY, ERRORS_KEY, ENERGY_KEY)
"""Everything a compressed (L-GreCo) reply's ArrayRecord may hold."""


def compressed_payload(record, max_bytes: int) -> dict[str, np.ndarray]:
    """A compressed reply's arrays, each ``.npy`` header checked; ``ValueError`` for more
    than ``max_bytes`` or arrays that are not part of a compressed update."""
    if sum(len(a.data) for a in record.values() if isinstance(a, Array)) > max_bytes:
        raise ValueError(f"reply holds more than the {max_bytes} bytes allowed")
    unknown = sorted(set(record.keys()) - set(UPDATE_KEYS))
    if unknown:
        raise ValueError(f"unexpected arrays {unknown[:5]} in a compressed reply")
    return {k: read_array(a, k, max_bytes) for k, a in record.items()}


def payload_bytes(array: Array) -> int:
    """Bytes of an array's values (what the codecs count), without trusting its header:
    a header that does not match its data counts as the bytes that travelled."""
    try:
        return int(read_array(array, "array").nbytes)
    except ValueError:
        return len(array.data) if isinstance(array, Array) else 0


def default_reply_bytes(global_arrays: dict[str, np.ndarray]) -> int:
    """Default byte limit of a reply: the global arrays in float64, twice, plus 1 MiB.

    Room for float64 replies and for clients of any rank up to the global one; far below
    what a malicious header or rank could make the server allocate.
    """
    return 2 * sum(8 * int(np.size(a)) for a in global_arrays.values()) + (1 << 20)


def screen_evaluate_replies(
    replies: Iterable[Message], weighted_by_key: str, max_weight: float = MAX_WEIGHT,
    node_max_weights: Mapping[str, float] | None = None,
) -> tuple[list[Message], int]:
    """Evaluate replies whose one MetricRecord holds a valid weight (within the node's declared
    maximum, where sites are declared) and only finite numbers (or lists of them); each other
    reply is logged with its node id and dropped.

    Returns the kept replies and how many were dropped.
    """
    kept, dropped = [], 0
    for msg in replies:
        node = msg.metadata.src_node_id
        try:
            if msg.has_error():
                raise ValueError(msg.error.reason)
            check_records(msg.content)
            check_declared_weight(node, reply_weight(msg.content, weighted_by_key, max_weight), node_max_weights)
            for key, value in reply_metrics(msg.content).items():
                for item in value if isinstance(value, list) else [value]:
                    finite_number(item, f"metric '{key}'")
        except Exception as err:  # noqa: BLE001  (no reply may crash the round)
            log(WARNING, "Dropping evaluate reply from node %s: %s", node, err)
            dropped += 1
            continue
        kept.append(msg)
    return kept, dropped


def metric_problem(key: str, items: list[float], weight) -> str | None:
    """Why an honest site could not have sent metric ``key`` with these values, or None."""
    if SERVER_METRICS.search(key):
        return "uses the name of a figure the server computes"
    how = metric_reduction(key)
    if how in ("sum", "min") and any(v < 0 for v in items):  # counts: a negative one would subtract
        return "is a negative count"
    # A count the federation sums (eval-n) cannot exceed the reply's weight (as capped).
    if how == "sum" and isinstance(weight, (int, float)) and any(v > weight for v in items):
        return f"is more than its {weight:g} examples (as capped)"
    if UNIT_INTERVAL_METRICS.match(key) and any(not 0.0 <= v <= 1.0 for v in items):
        return "is outside [0, 1]"
    return None


def share_weight_cap(replies: list[Message], weighted_by_key: str, share_cap: float | None) -> float | None:
    """``share_cap`` times the median weight of 3 or more replies (None for fewer, or no cap):
    no claimed sample count buys a site the federation's evaluate figures."""
    if not share_cap or len(replies) < 3:
        return None
    return share_cap * float(np.median([float(reply_metrics(m.content)[weighted_by_key]) for m in replies]))


def consistent_metrics(replies: list[Message], weighted_by_key: str, weight_cap: float | None = None,
                       log_caps: bool = True, known_keys: re.Pattern | None = None) -> list[RecordDict]:
    """The replies' MetricRecords with every metric kept only where it has one type and length
    across replies (Flower's weighted mean of a float and a list raises); dropped metrics are
    logged with the node that sent them. A weight above ``weight_cap`` is capped (logged)."""
    shapes: dict[str, dict] = {}
    for msg in replies:
        for key, value in reply_metrics(msg.content).items():
            shape = len(value) if isinstance(value, list) else None
            shapes.setdefault(key, {}).setdefault(shape, []).append(msg.metadata.src_node_id)
    contents = []
    for msg in replies:
        clean = MetricRecord()
        metrics = reply_metrics(msg.content)
        weight = metrics.get(weighted_by_key)
        if weight_cap is not None and isinstance(weight, (int, float)) and weight > weight_cap:
            if log_caps:
                log(WARNING, "Capping the weight of node %s: %.6g claimed, %.6g allowed", msg.metadata.src_node_id, weight, weight_cap)
            weight = weight_cap
        for key, value in metrics.items():
            shape = len(value) if isinstance(value, list) else None
            seen = shapes[key]
            majority = max(seen, key=lambda s: len(seen[s]))
            try:
                items = [finite_number(v, key) for v in (value if isinstance(value, list) else [value])]
            except ValueError as err:
                log(WARNING, "Ignoring metric from node %s: %s", msg.metadata.src_node_id, err)
                continue
            problem = metric_problem(key, items, weight)
            if known_keys is not None and not known_keys.fullmatch(key):
                problem = "is not a metric this federation's clients send"
            if problem:
                log(WARNING, "Ignoring metric '%s' from node %s: %r %s", key, msg.metadata.src_node_id, value, problem)
                continue
            if shape != majority and key != weighted_by_key:
                log(WARNING, "Ignoring metric '%s' from node %s: %r does not match the other replies", key,
                    msg.metadata.src_node_id, value)
                continue
            clean[key] = items if isinstance(value, list) else (weight if key == weighted_by_key else value)
        contents.append(RecordDict({"metrics": clean}))
    return contents


def aggregate_reply_metrics(aggr_fn, replies: list[Message], weighted_by_key: str, kind: str,
                            weight_cap: float | None = None, known_keys: re.Pattern | None = None) -> MetricRecord:
    """``aggr_fn`` (a strategy's ``*_metrics_aggr_fn``) over the replies' consistent metrics.

    Each content keeps its other records and gains the sender's node id
    (:data:`~fedlowrank.wire.REPLY_NODE_KEY`), so an aggregation function can name the node.
    A function that raises loses the round's metrics, never the round (logged).
    """
    contents = []
    # Training caps were logged by the round itself.
    for msg, clean in zip(replies, consistent_metrics(replies, weighted_by_key, weight_cap, log_caps=kind != "train",
                                                          known_keys=known_keys)):
        content = RecordDict({**{k: v for k, v in msg.content.items() if not isinstance(v, MetricRecord)}, **clean})
        content[REPLY_NODE_KEY] = ConfigRecord({"node-id": int(msg.metadata.src_node_id)})
        contents.append(content)
    try:
        metrics = aggr_fn(contents, weighted_by_key)
    except Exception as err:  # noqa: BLE001  (a bad metric must not lose the round)
        log(WARNING, "%s metrics not aggregated: %s", kind, err)
        metrics = None
    return MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()


def weighted_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Every metric over the replies that carry it: the weighted mean (lists element-wise),
    or the sum, minimum or maximum the wire contract names (:func:`fedlowrank.wire.metric_reduction`).

    Flower's ``aggregate_metricrecords`` divides every metric by the total weight of all
    replies, so a metric one reply lacks (or that was left out as malformed) would be
    pulled towards zero; here each metric is normalised by the weights of its own replies.
    A mean of sample counts (996.05) or of the sites' epsilons means nothing.
    """
    sums: dict[str, object] = {}
    weights: dict[str, float] = {}
    reduced: dict[str, float] = {}
    combine = {"sum": lambda a, b: a + b, "min": min, "max": max}
    for record in records:
        metrics = reply_metrics(record)
        w = float(metrics[weighted_by_key])
        for key, value in metrics.items():
            if key == weighted_by_key:
                continue
            how = metric_reduction(key)
            if how != "mean" and not isinstance(value, list):
                reduced[key] = float(value) if key not in reduced else combine[how](reduced[key], float(value))
                continue
            if isinstance(value, list):
                term = [w * float(v) for v in value]
                sums[key] = term if key not in sums else [a + b for a, b in zip(sums[key], term)]
            else:
                sums[key] = w * float(value) + float(sums.get(key, 0.0))
            weights[key] = weights.get(key, 0.0) + w
    out = MetricRecord({key: int(round(value)) if float(value).is_integer() else value for key, value in reduced.items()})
    for key, total in sums.items():
        scale = 1.0 / weights[key] if weights[key] > 0 else 0.0
        out[key] = [v * scale for v in total] if isinstance(total, list) else total * scale
    return out
