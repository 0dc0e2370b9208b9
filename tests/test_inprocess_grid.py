"""InProcessGrid delivers messages as a SuperNode would, errors included."""

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedlowrank.strategies.testing import InProcessGrid


def test_a_client_that_raises_replies_with_an_error_and_the_round_goes_on(caplog):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        site = int(context.node_config["partition-id"])
        if site == 1:
            raise ValueError("global tensor out of range")
        w = msg.content["arrays"]["w"].numpy() + 10.0 * (site + 1)
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w)}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = InProcessGrid(app, [{"partition-id": i} for i in range(3)], {})
    replies = grid.send_and_receive([grid.create_message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2))})}),
                                                         "train", node, "g1") for node in grid.get_node_ids()])
    failed = [r for r in replies if r.has_error()]
    assert len(replies) == 3 and len(failed) == 1 and "global tensor out of range" in failed[0].error.reason
    assert failed[0].metadata.src_node_id == 2

    # Through a strategy: the failed node is left out and the run ends normally.
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3)
    with caplog.at_level(logging.ERROR):
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(2))}), num_rounds=1)
    assert np.allclose(result.arrays["w"].numpy(), (10.0 + 30.0) / 2)
    assert "node 2 raised" in caplog.text
