"""Testing helpers for strategies, as ``numpy.testing`` ships with numpy: used by our tests
and benchmarks, and by anyone who plugs a strategy into their own app.

- :func:`run_round` drives one real round of a strategy (``configure_train`` then
  ``aggregate_train``) on replies built with :func:`train_reply`;
- :class:`InProcessGrid` runs a whole ``strategy.start`` against a ``ClientApp`` in one
  process: no SuperLink, no Ray.

:class:`InProcessGrid` is a Flower ``Grid`` that delivers each message straight to a
``ClientApp`` with the node's ``Context`` and collects the reply. ``strategy.start``
then runs exactly as under ``flwr run`` (same ``configure_*``/``aggregate_*`` calls,
same client code, real ``Message`` objects), which makes it the tool for tests and for
experiments with many paired seeds where launching a simulation per run costs more
than the run. It is sequential and keeps no per-node isolation beyond each node's own
``Context``; use ``flwr run`` for anything else.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from logging import ERROR

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0


@contextmanager
def task_identity(run_id: int = 1) -> Iterator[None]:
    """The run and node identity a ServerApp has, for strategy calls made outside one
    (instruction messages read it)."""
    saved = {name: getattr(TaskIdentity, name) for name in ("_run_id", "_node_id", "_task_id")}
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = run_id, SERVER_NODE_ID, 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


class NodeGrid:
    """The part of a ``Grid`` that ``configure_train`` uses: the connected node ids."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def array_record(arrays: Mapping, dtype=np.float32) -> ArrayRecord:
    """Arrays as an ArrayRecord, cast to ``dtype`` (``None`` keeps each array's own, e.g. encoded bytes)."""
    # np.array(order="C"), not np.ascontiguousarray, which turns a 0-d array into shape (1,).
    return ArrayRecord({k: Array(np.array(np.asarray(v, dtype=dtype), order="C")) for k, v in arrays.items()})


def train_reply(node_id: int, arrays: Mapping, num_examples: float, dtype=np.float32, **metrics) -> Message:
    """A train reply from ``node_id`` carrying ``arrays`` and a MetricRecord, as the SuperLink delivers it."""
    content = RecordDict(
        {"arrays": array_record(arrays, dtype), "metrics": MetricRecord({"num-examples": num_examples, **metrics})}
    )
    metadata = Metadata(
        run_id=1, message_id=f"reply-{node_id}", src_node_id=node_id, dst_node_id=SERVER_NODE_ID,
        reply_to_message_id=f"instruction-{node_id}", group_id="1", created_at=0.0, ttl=60.0, message_type="train",
    )
    return Message(content=content, metadata=metadata)


def configure_round(strategy, arrays: ArrayRecord | Mapping, server_round: int = 1, config: Mapping | None = None,
                    nodes: Iterable[int] = range(1, 11), dtype=np.float32) -> list[Message]:
    """``strategy.configure_train`` for one round, as the ServerApp calls it; its instructions."""
    record = arrays if isinstance(arrays, ArrayRecord) else array_record(arrays, dtype)
    with task_identity():
        return list(strategy.configure_train(server_round, record, ConfigRecord(dict(config or {})), NodeGrid(nodes)))


def run_round(strategy, arrays: ArrayRecord | Mapping, replies: Iterable[Message], server_round: int = 1,
              config: Mapping | None = None, dtype=np.float32) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One training round through the strategy's public API: ``configure_train`` with the
    global ``arrays`` (cast to ``dtype`` unless already an ArrayRecord), then
    ``aggregate_train`` on ``replies``; returns what ``aggregate_train`` returns."""
    replies = list(replies)
    # Enough nodes for FedAvg's sampling (it waits for its minimum); the instructions are discarded.
    nodes = sorted({m.metadata.src_node_id for m in replies} | {10**6 + i for i in range(10)})
    configure_round(strategy, arrays, server_round, config, nodes, dtype)
    with task_identity():
        return strategy.aggregate_train(server_round, replies)


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ``ClientApp`` calls in this process.

    Parameters
    ----------
    app : ClientApp
        The client application every node runs.
    node_configs : sequence of mapping
        One node config per node (e.g. ``{"partition-id": i, "num-partitions": n}``);
        node ids are ``1 .. len(node_configs)``.
    run_config : mapping
        The run config every node sees.
    run_id : int (default: 1)

    Notes
    -----
    A ``ClientApp`` that raises replies with an error message (code
    ``CLIENT_APP_RAISED_EXCEPTION``), as a SuperNode does, and the round goes on.
    Instruction messages read the run identity of the running ServerApp
    (``TaskIdentity``), which only ``flwr run`` sets; the constructor sets it for
    this process.
    """

    def __init__(
        self,
        app: ClientApp,
        node_configs: Iterable[Mapping],
        run_config: Mapping,
        run_id: int = 1,
    ) -> None:
        self.app = app
        self.run_id = run_id
        self.contexts = {
            node: Context(run_id, node, dict(cfg), RecordDict(), dict(run_config))
            for node, cfg in enumerate(node_configs, start=1)
        }
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 0
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}

    @property
    def run(self):
        raise NotImplementedError("InProcessGrid has no Run object")

    def set_run(self, run) -> None:
        raise NotImplementedError("InProcessGrid has no Run object")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def get_nodes(self):
        raise NotImplementedError("InProcessGrid only knows node ids")

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Run each message on its node now; return the ids to pull the replies with."""
        ids = []
        for msg in messages:
            message_id = f"m{next(self._ids)}"
            delivered = Message(content=msg.content, metadata=self._delivered(msg.metadata, message_id))
            try:
                reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001  (as a SuperNode does: the node replies with an error)
                log(ERROR, "ClientApp of node %s raised an exception: %s", msg.metadata.dst_node_id, err)
                reason = f"{type(err)}:<'{err}'>"  # the reason format Flower's runtime uses
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=delivered)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    @staticmethod
    def _delivered(meta: Metadata, message_id: str) -> Metadata:
        """The instruction's metadata with the id the SuperLink would assign."""
        return Metadata(
            run_id=meta.run_id, message_id=message_id, src_node_id=meta.src_node_id,
            dst_node_id=meta.dst_node_id, reply_to_message_id=meta.reply_to_message_id,
            group_id=meta.group_id, created_at=meta.created_at, ttl=meta.ttl,
            message_type=meta.message_type, src_task_id=meta.src_task_id, dst_task_id=meta.dst_task_id,
        )

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
