"""Per-reply checks shared by our strategies: a bad reply is named, logged and dropped.

Flower's own consistency check rejects the whole round when one reply is malformed;
a federation of hospitals should lose one site's update, not the round.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import log

from fedlowrank.adapters import split_factor_key


def reply_weight(content: RecordDict, weighted_by_key: str) -> float:
    """The reply's aggregation weight; ``ValueError`` if missing, negative or not finite."""
    if len(content.metric_records) != 1:
        raise ValueError(f"expected one MetricRecord, got {len(content.metric_records)}")
    metrics = next(iter(content.metric_records.values()))
    if weighted_by_key not in metrics:
        raise ValueError(f"MetricRecord lacks the weight key '{weighted_by_key}'")
    weight = metrics[weighted_by_key]
    if isinstance(weight, list) or not np.isfinite(weight) or weight < 0:
        raise ValueError(f"weight '{weighted_by_key}' = {weight!r} must be a finite number >= 0")
    return float(weight)


def reply_arrays(content: RecordDict, expected: ArrayRecord) -> dict[str, np.ndarray]:
    """The reply's arrays, checked against the arrays the server sent.

    Factors (``*.lora_U/S/V``) may change rank but must keep the layer's row counts;
    every other array must keep its shape. All values must be finite.
    """
    if len(content.array_records) != 1:
        raise ValueError(f"expected one ArrayRecord, got {len(content.array_records)}")
    record = next(iter(content.array_records.values()))
    if set(record.keys()) != set(expected.keys()):
        missing = sorted(set(expected.keys()) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(expected.keys()))
        raise ValueError(f"array keys differ from the global model: missing {missing}, unexpected {extra}")
    arrays: dict[str, np.ndarray] = {}
    for key in expected.keys():
        got = record[key].numpy()
        want = expected[key].shape
        factor = split_factor_key(key)
        if factor is None:
            if tuple(got.shape) != tuple(want):
                raise ValueError(f"tensor '{key}' has shape {got.shape}, expected {tuple(want)}")
        elif got.ndim != 2 or got.shape[0] != want[0]:
            raise ValueError(f"factor '{key}' has shape {got.shape}, expected ({want[0]}, rank)")
        if not np.all(np.isfinite(got)):
            raise ValueError(f"tensor '{key}' contains NaN or Inf")
        arrays[key] = got
    for module in {f[0] for f in map(split_factor_key, arrays) if f is not None}:
        ranks = {leaf: arrays[f"{module}.{leaf}"].shape[1] for leaf in ("lora_U", "lora_S", "lora_V")}
        if len(set(ranks.values())) != 1:
            raise ValueError(f"factors of '{module}' disagree on rank: {ranks}")
    return arrays


def screen_replies(
    replies: Iterable[Message], expected: ArrayRecord, weighted_by_key: str
) -> list[tuple[Message, dict[str, np.ndarray], float]]:
    """Keep the replies that pass :func:`reply_arrays` and :func:`reply_weight`.

    Each dropped reply is logged with its node id and the reason.
    """
    kept = []
    for msg in replies:
        if msg.has_error():
            log(WARNING, "Dropping reply from node %s: %s", msg.metadata.src_node_id, msg.error.reason)
            continue
        try:
            arrays = reply_arrays(msg.content, expected)
            weight = reply_weight(msg.content, weighted_by_key)
        except ValueError as err:
            log(WARNING, "Dropping reply from node %s: %s", msg.metadata.src_node_id, err)
            continue
        kept.append((msg, arrays, weight))
    return kept
