"""DP-SGD in the real ClientApp: epsilon reported each round, accountant in Context.state, budget stop."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlowrank.adapters import exchange_state
from fedlowrank.clients import AdapterConfig, ClientData, DPConfig, build_client_app, to_record
from fedlowrank.clients.app import build_model
from fedlowrank.clients.private import ACCOUNTANT_KEY
from fedlowrank.privacy import epsilon_spent

ADAPTER = AdapterConfig(target_modules=r"0|2", rank=2, groups=2, trainable=r"4\..*")


def model_fn(context):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def data_fn(context):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(128, 6, generator=gen)
    y = (x[:, 0] > 0).float()
    g = (x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y, g), batch_size=32, shuffle=True)
    return ClientData(train=loader, test=DataLoader(TensorDataset(x, y, g), batch_size=64), num_groups=2)


pytestmark = pytest.mark.usefixtures("task_identity")


def new_context():
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def train_message(arrays):
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.01, "local-epochs": 1})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def initial_arrays():
    return to_record(exchange_state(build_model(model_fn, ADAPTER, new_context())))


def test_epsilon_grows_per_round_and_the_accountant_lives_in_context_state():
    dp = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3, target_epsilon=50.0)
    app = build_client_app(model_fn, data_fn, ADAPTER, dp=dp)
    ctx = new_context()
    arrays = initial_arrays()
    epsilons = []
    for _ in range(3):
        reply = app(train_message(arrays), ctx)
        metrics = reply.content["metrics"]
        # Poisson sampling: about the 128 local examples pass per epoch, not exactly.
        assert metrics["dp_stopped"] == 0 and 64 < metrics["num-examples"] < 192
        epsilons.append(metrics["dp_epsilon"])
        # The reported epsilon is what the stored history gives, computed independently.
        assert epsilon_spent(dict(ctx.state[ACCOUNTANT_KEY]), delta=1e-3) == pytest.approx(epsilons[-1], rel=1e-6)
        assert set(reply.content["arrays"].keys()) == set(arrays.keys())
        arrays = reply.content["arrays"]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    assert all(np.all(np.isfinite(a.numpy())) for a in arrays.values())


def test_client_stops_when_the_next_round_would_exceed_the_budget():
    probe = build_client_app(model_fn, data_fn, ADAPTER, dp=DPConfig(noise_multiplier=1.1, delta=1e-3, target_epsilon=1e9))
    ctx = new_context()
    one_round = probe(train_message(initial_arrays()), ctx).content["metrics"]["dp_epsilon"]
    two_rounds = probe(train_message(initial_arrays()), ctx).content["metrics"]["dp_epsilon"]
    # A budget that fits one round but not two (RDP composes sublinearly: measure, don't assume).
    budget = (one_round + two_rounds) / 2
    app = build_client_app(model_fn, data_fn, ADAPTER, dp=DPConfig(noise_multiplier=1.1, delta=1e-3, target_epsilon=budget))
    ctx = new_context()
    sent = initial_arrays()
    first = app(train_message(sent), ctx).content["metrics"]
    assert first["dp_stopped"] == 0
    reply = app(train_message(sent), ctx)
    second = reply.content["metrics"]
    assert second["dp_stopped"] == 1 and second["num-examples"] == 0
    assert second["dp_epsilon_if_trained"] > budget >= second["dp_epsilon"]
    # Nothing trained: the reply is the global adapter it was sent, which weight 0 keeps out.
    for key in sent.keys():
        assert np.array_equal(reply.content["arrays"][key].numpy(), sent[key].numpy())


def test_dp_training_and_lgreco_compression_compose():
    """DP-SGD trains, then the update is compressed with error feedback: both states persist."""
    from fedlowrank.clients import EF_STATE_KEY
    from fedlowrank.compression import decode_update, settings_to_config

    dp = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3, target_epsilon=50.0)
    app = build_client_app(model_fn, data_fn, ADAPTER, dp=dp)
    ctx = new_context()
    arrays = initial_arrays()
    settings = {k: "sq:2" for k in arrays.keys()}
    epsilons = []
    for _ in range(2):
        msg = train_message(arrays)
        msg.content["config"].update(settings_to_config(settings))
        reply = app(msg, ctx)
        metrics = reply.content["metrics"]
        epsilons.append(metrics["dp_epsilon"])
        assert epsilon_spent(dict(ctx.state[ACCOUNTANT_KEY]), delta=1e-3) == pytest.approx(epsilons[-1], rel=1e-6)
        assert EF_STATE_KEY in ctx.state  # the residual survives next to the accountant
        shapes = {k: a.shape for k, a in arrays.items()}
        delta = decode_update({k: a.numpy() for k, a in reply.content["arrays"].items()}, shapes, settings)
        assert set(delta) == set(arrays.keys()) and all(np.all(np.isfinite(d)) for d in delta.values())
        assert any(np.any(d != 0) for d in delta.values())
        arrays = to_record({k: torch.from_numpy(arrays[k].numpy() + delta[k]) for k in delta})
    assert 0 < epsilons[0] < epsilons[1]


def test_dp_training_composes_with_secure_aggregation():
    """Real DP-SGD clients under secure aggregation (FairLoRA, groups summed securely): epsilon still reported
    (the worst site's, in the clear), everything else only as sums, the accountant in each site's Context."""
    from fedlowrank.strategies import FairLoRA, SecureLowRank
    from fedlowrank.strategies.checkpoint import run
    from fedlowrank.strategies.testing import InProcessGrid

    dp = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3, target_epsilon=50.0)
    app = build_client_app(model_fn, data_fn, ADAPTER, dp=dp)
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(3)], {})
    strategy = SecureLowRank(FairLoRA(rank=2, share_cap=None, fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3))
    result = run(strategy, grid, initial_arrays(), num_rounds=2, timeout=60,
                 train_config=ConfigRecord({"lr": 0.01, "local-epochs": 1}))
    epsilons = [result.train_metrics_clientapp[r]["dp_epsilon"] for r in (1, 2)]
    assert 0 < epsilons[0] < epsilons[1]
    assert all(result.train_metrics_clientapp[r]["agg-clients-kept"] == 3 for r in (1, 2))
    for context in grid.contexts.values():
        assert epsilon_spent(dict(context.state[ACCOUNTANT_KEY]), delta=1e-3) == pytest.approx(epsilons[-1], rel=1e-6)
