"""A run in which no round kept a valid reply fails, naming the cause as the sites reported it."""

import logging

import pytest
import torch
from flwr.app import ConfigRecord
from torch import nn

from fedlowrank.adapters import exchange_state, inject_adapters
from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, to_record
from fedlowrank.results import RunFailed, failure_cause, readable_reason
from fedlowrank.strategies import FedLowRank
from fedlowrank.strategies.checkpoint import run
from fedlowrank.strategies.testing import InProcessGrid

SITES = 3
ADAPTER = AdapterConfig(target_modules=r"^0$", rank=2, trainable=r"^2\..*")

pytestmark = pytest.mark.usefixtures("task_identity")


def base_model(context=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 1))


def site_data(partition):
    gen = torch.Generator().manual_seed(partition)
    x = torch.randn(64, 8, generator=gen)
    y, g = (x[:, 1] > 0).long(), (x[:, 0] > 0).long()
    return ClientData([(x[:32], y[:32], g[:32]), (x[32:], y[32:], g[32:])], [(x, y, g)], 2)


def federation(data, rounds=2):
    app = build_client_app(base_model, data, ADAPTER, lr=0.02)
    model = base_model()
    inject_adapters(model, ADAPTER.target_modules, rank=2, trainable=ADAPTER.trainable)
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)], {})
    return lambda: run(FedLowRank(fraction_evaluate=0.0), grid, to_record(exchange_state(model)), rounds,
                       train_config=ConfigRecord({"local-epochs": 1}))


def test_a_run_where_every_site_raises_fails_naming_the_error_and_the_extra_to_install():
    def no_opacus(context):
        raise ModuleNotFoundError("No module named 'opacus'")

    with pytest.raises(RunFailed) as failed:
        federation(no_opacus)()
    message = str(failed.value)
    assert message.startswith("no round kept a valid reply: every site failed: ModuleNotFoundError: No module named 'opacus'")
    assert "install the [dp] extra" in message


def test_a_run_where_some_rounds_aggregate_does_not_fail():
    calls = []

    def fails_in_round_one(context):
        calls.append(1)
        if len(calls) <= SITES:  # every site's first train call
            raise RuntimeError("disk full")
        return site_data(int(context.node_config["partition-id"]))

    result = federation(fails_in_round_one)()
    assert result.train_metrics_clientapp[2]["agg-clients-kept"] == SITES
    assert 1 not in result.train_metrics_clientapp


def test_rejected_replies_and_silent_sites_are_named_as_the_cause(caplog):
    assert "rejected all 3 replies" in failure_cause([], replies=3, asked=3, timeout=60)
    assert failure_cause([], replies=0, asked=6, timeout=60) == "no site replied within round-timeout = 60 s (6 requests)"
    mixed = failure_cause(["<class 'ValueError'>:<'bad'>"], replies=3, asked=3, timeout=60)
    assert mixed.startswith("1 of 3 replies were errors (ValueError: bad)")
    majority = failure_cause(["<class 'OSError'>:<'disk'>"] * 2 + ["<class 'KeyError'>:<'x'>"], replies=3, asked=3, timeout=1)
    assert majority == "every site failed: OSError: disk (2 of 3 replies)"


@pytest.mark.parametrize(
    ("reason", "readable"),
    [
        ("<class 'ModuleNotFoundError'>:<'No module named 'monai''>",
         "ModuleNotFoundError: No module named 'monai'; install the [imaging] extra (pip install 'fedlowrank[imaging]')"),
        ("<class 'torch.OutOfMemoryError'>:<'CUDA out of memory'>", "OutOfMemoryError: CUDA out of memory"),
        ("An exception was raised when attempting to load `ClientApp`", "An exception was raised when attempting to load `ClientApp`"),
        ("<class 'ModuleNotFoundError'>:<'No module named 'sklearn''>", "ModuleNotFoundError: No module named 'sklearn'; install the [imaging] extra (pip install 'fedlowrank[imaging]')"),
    ],
)
def test_flower_error_reasons_read_as_a_person_would_write_them(reason, readable):
    assert readable_reason(reason) == readable


def test_a_site_that_does_not_reply_is_named_in_the_round_log(caplog):
    """A grid that loses node 2's reply (as a timed-out SuperNode would)."""
    app = build_client_app(base_model, lambda ctx: site_data(int(ctx.node_config["partition-id"])), ADAPTER, lr=0.02)
    model = base_model()
    inject_adapters(model, ADAPTER.target_modules, rank=2, trainable=ADAPTER.trainable)

    class LossyGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [r for r in super().send_and_receive(messages, timeout=timeout) if r.metadata.src_node_id != 2]

    grid = LossyGrid(app, [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)], {})
    with caplog.at_level(logging.WARNING):
        result = run(FedLowRank(fraction_evaluate=0.0), grid, to_record(exchange_state(model)), 1,
                     timeout=30, train_config=ConfigRecord({"local-epochs": 1}))
    assert result.train_metrics_clientapp[1]["agg-clients-kept"] == SITES - 1
    assert any("no reply within 30 s from node(s) 2" in r.getMessage() for r in caplog.records)
    from fedlowrank.strategies.serverapp import round_line

    assert f"| sites {SITES - 1} kept, 0 dropped, 1 silent past round-timeout" in round_line(1, 1, result, ("a", "b"))


def test_a_simulated_sites_ray_wrapped_traceback_reads_as_its_own_error():
    """In simulation Flower's reason is Ray's wrapper around the whole traceback."""
    reason = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1, ip=192.0.2.2)\n"
        '  File "client_app.py", line 161, in __call__\n'
        "    from opacus.accountants import RDPAccountant\n"
        "ModuleNotFoundError: No module named 'opacus'\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "flwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: No module named 'opacus''>"
    )
    assert readable_reason(reason) == (
        "ModuleNotFoundError: No module named 'opacus'; install the [dp] extra (pip install 'fedlowrank[dp]')"
    )


def test_a_run_whose_sites_all_stopped_for_their_dp_budget_says_so():
    cause = failure_cause([], replies=4, asked=4, timeout=60, idle=4, stopped=4)
    assert cause.startswith("every site stopped training: its DP budget would be exceeded (4 replies with dp_stopped = 1")
    assert "no examples (2 replies" in failure_cause(["<class 'ValueError'>:<'bad'>"], replies=3, asked=3, timeout=60, idle=2)
    assert "rejected" in failure_cause([], replies=3, asked=3, timeout=60, idle=1)  # one idle site is not the cause


def test_the_run_loop_counts_sites_that_stopped_for_their_dp_budget():
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def stopped(msg, context):  # what a DP client whose next round would exceed its budget sends
        metrics = MetricRecord({"num-examples": 0, "dp_stopped": 1, "dp_epsilon": 7.9})
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)

    model = base_model()
    inject_adapters(model, ADAPTER.target_modules, rank=2, trainable=ADAPTER.trainable)
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)], {})
    with pytest.raises(RunFailed, match=r"every site stopped training: its DP budget would be exceeded \(6 replies"):
        run(FedLowRank(fraction_evaluate=0.0), grid, to_record(exchange_state(model)), 2, timeout=30,
            train_config=ConfigRecord({"local-epochs": 1}))
