"""Build real Flower reply Messages for strategy tests, as the SuperLink would deliver them."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict


def array_record(arrays: dict, dtype=np.float32) -> ArrayRecord:
    """Arrays as an ArrayRecord, cast to ``dtype`` (``None`` keeps each array's own, e.g. encoded bytes)."""
    # np.array(order="C"), not np.ascontiguousarray, which turns a 0-d array into shape (1,).
    return ArrayRecord({k: Array(np.array(np.asarray(v, dtype=dtype), order="C")) for k, v in arrays.items()})


def train_reply(node_id: int, arrays: dict, num_examples: float, dtype=np.float32, **metrics) -> Message:
    """A train reply from ``node_id`` carrying ``arrays`` and a MetricRecord."""
    content = RecordDict(
        {"arrays": array_record(arrays, dtype), "metrics": MetricRecord({"num-examples": num_examples, **metrics})}
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node_id}",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)
