"""The client refuses what it cannot train on, with an error that names it."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn

from fedlowrank.adapters import exchange_state, inject_adapters
from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, to_record


pytestmark = pytest.mark.usefixtures("task_identity")


def base(context=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))


def app_with(labels, groups, num_groups=1):
    x = torch.randn(len(labels), 6)
    data = ClientData([(x, torch.tensor(labels), torch.tensor(groups))], [(x, torch.tensor(labels), torch.tensor(groups))], num_groups)
    adapter = AdapterConfig(target_modules=r"^0$", rank=2, groups=num_groups, trainable=r"^2\..*")
    return build_client_app(base, lambda ctx: data, adapter), adapter


def train(app, adapter, arrays=None):
    model = base()
    inject_adapters(model, adapter.target_modules, rank=2, groups=adapter.groups, trainable=adapter.trainable)
    record = to_record(exchange_state(model)) if arrays is None else arrays(to_record(exchange_state(model)))
    msg = Message(content=RecordDict({"arrays": record, "config": ConfigRecord({"lr": 0.01})}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    return app(msg, Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}))


def test_labels_outside_zero_one_are_refused_for_a_one_logit_model():
    app, adapter = app_with([0, 1, 2, 1], [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"labels must be 0 or 1 .* got \[2\]"):
        train(app, adapter)


def test_group_ids_outside_the_adapters_groups_are_refused():
    app, adapter = app_with([0, 1, 0, 1], [0, 1, 5, -1], num_groups=2)
    with pytest.raises(ValueError, match=r"group ids must be -1 \(unknown\) or 0..1; got \[5\]"):
        train(app, adapter)


@pytest.mark.parametrize("value,match", [(1e30, "has an entry of 1e\\+30"), (np.nan, "contains NaN or Inf")])
def test_a_broken_global_from_the_server_is_refused(value, match):
    app, adapter = app_with([0, 1, 0, 1], [0, 0, 0, 0])

    def spoil(record):
        head = record["2.weight"].numpy().copy()
        head[0, 0] = value
        record["2.weight"] = Array(head)
        return record

    with pytest.raises(ValueError, match=f"global tensor '2.weight' from the server {match}"):
        train(app, adapter, spoil)


def test_a_clean_client_still_trains():
    app, adapter = app_with([0, 1, 0, 1], [0, 0, 0, 0])
    reply = train(app, adapter)
    assert reply.content["metrics"]["num-examples"] == 4
