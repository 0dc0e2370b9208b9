"""Run a strategy against a ``ClientApp`` in one process: no SuperLink, no Ray.

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
from collections.abc import Iterable, Mapping

from logging import ERROR

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0


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
