"""Client side of L-GreCo: the real ClientApp on real Flower Messages and Contexts."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn

from fedlowrank.adapters import exchange_state, load_exchange_state
from fedlowrank.clients import EF_STATE_KEY, AdapterConfig, ClientData, build_client_app, predict, to_record
from fedlowrank.clients.app import build_model
from fedlowrank.clients.compression import compress_arrays, model_update
from fedlowrank.compression import (
    CANDIDATES_KEY,
    ENERGY_KEY,
    ERRORS_KEY,
    PAYLOAD_KEY,
    SPEC_KEY,
    decode_update,
    settings_to_config,
)
from fedlowrank.strategies import FedLowRank, LGreCo
from fedlowrank.strategies.testing import NodeGrid

ADAPTER = AdapterConfig(target_modules=r"net\.(0|2)", rank=2, trainable=r"net\.4\..*")
SETTINGS = {
    "net.0.lora_U": "powersgd:1",
    "net.0.lora_S": "none",
    "net.0.lora_V": "topk:0.25",
    "net.2.lora_U": "qsgd:4",
    "net.2.lora_S": "none",
    "net.2.lora_V": "powersgd:1",
    "net.4.weight": "topk:0.5",
    "net.4.bias": "none",
}
CANDS = ["none", "powersgd:1", "topk:0.25", "qsgd:4"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def model_fn(context):
    torch.manual_seed(0)  # the same frozen base on every node
    return Net()


def data_fn(context):
    """A seeded linear task per partition, fixed batch order (training is deterministic)."""
    gen = torch.Generator().manual_seed(100 + int(context.node_config.get("partition-id", 0)))
    x = torch.randn(96, 12, generator=gen)
    y = (x[:, :3].sum(1) > 0).float()
    g = torch.zeros(96, dtype=torch.long)
    batches = [(x[i : i + 32], y[i : i + 32], g[i : i + 32]) for i in range(0, 96, 32)]
    return ClientData(train=batches, test=batches)


APP = build_client_app(model_fn, data_fn, ADAPTER, lr=0.02)


pytestmark = pytest.mark.usefixtures("task_identity")


def context(node=1, partition=0, **node_config):
    return Context(
        run_id=1, node_id=node, node_config={"partition-id": partition, **node_config}, state=RecordDict(), run_config={}
    )


def initial_arrays():
    return {k: a.numpy() for k, a in to_record(exchange_state(build_model(model_fn, ADAPTER, context()))).items()}


def train_message(arrays, extra_config=None, node=1):
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}),
            "config": ConfigRecord({"lr": 0.02, **(extra_config or {})}),
        }
    )
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def reply_arrays(reply):
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def residuals(ctx):
    record = ctx.state.array_records[EF_STATE_KEY]
    return {k[len("residual/") :]: a.numpy() for k, a in record.items() if k.startswith("residual/")}


def test_without_lgreco_keys_the_reply_is_plain_and_state_untouched():
    glob = initial_arrays()
    ctx = context()
    reply = APP(train_message(glob), ctx)
    assert set(reply_arrays(reply)) == set(glob)
    assert EF_STATE_KEY not in ctx.state.array_records
    assert not any(k.startswith("lgreco") for k in reply.content["metrics"].keys())


def test_residual_persists_across_rounds_and_decoded_plus_residual_is_the_true_update():
    glob = initial_arrays()
    ctx = context()
    owed = {k: np.zeros_like(v, dtype=np.float64) for k, v in glob.items()}
    for rnd in (1, 2):
        # The same node, uncompressed and with a throwaway Context, gives the true local arrays.
        plain = reply_arrays(APP(train_message(glob), context()))
        reply = APP(train_message(glob, settings_to_config(SETTINGS)), ctx)
        sent = reply_arrays(reply)
        assert set(sent) == {SPEC_KEY, PAYLOAD_KEY}
        decoded = decode_update(sent, {k: v.shape for k, v in glob.items()}, SETTINGS)
        res = residuals(ctx)
        for name in glob:
            want = plain[name].astype(np.float64) - glob[name] + owed[name]
            np.testing.assert_allclose(decoded[name] + res[name], want, rtol=0, atol=1e-6, err_msg=name)
        meta = ctx.state.array_records[EF_STATE_KEY]["meta"].numpy()
        assert meta[1] == rnd  # the round counter advanced once per round
        assert reply.content["metrics"]["lgreco-residual-norm"] == pytest.approx(
            np.sqrt(sum(float(np.sum(r**2)) for r in res.values()))
        )
        target = np.sqrt(sum(float(np.sum((plain[k] - glob[k].astype(np.float64) + owed[k]) ** 2)) for k in glob))
        assert reply.content["metrics"]["lgreco-target-norm"] == pytest.approx(target, rel=1e-5)
        # Lossy settings owe something; "none" owes nothing.
        assert np.abs(res["net.0.lora_V"]).sum() > 0 and np.abs(res["net.4.bias"]).sum() == 0
        owed = res
        glob = {k: (glob[k] + decoded[k]).astype(np.float32) for k in glob}


def test_tables_come_only_when_candidates_are_asked_for():
    glob = initial_arrays()
    ctx = context()
    with_tables = reply_arrays(APP(train_message(glob, settings_to_config(SETTINGS, CANDS)), ctx))
    assert with_tables[ERRORS_KEY].shape == (len(SETTINGS), len(CANDS))
    assert with_tables[ERRORS_KEY].dtype == np.float16
    assert with_tables[ENERGY_KEY].shape == (len(SETTINGS), 2) and with_tables[ENERGY_KEY].dtype == np.float32
    # "none" loses only float32 rounding: its relative error rounds up to at most float16's smallest step.
    assert np.all(with_tables[ERRORS_KEY][:, CANDS.index("none")] <= 6e-8)
    without = reply_arrays(APP(train_message(glob, settings_to_config(SETTINGS)), ctx))
    assert ERRORS_KEY not in without and ENERGY_KEY not in without
    assert CANDIDATES_KEY not in without


def test_client_rank_above_the_global_is_refused_clearly():
    glob = initial_arrays()
    with pytest.raises(ValueError, match="rank 3 is above the global rank 2"):
        APP(train_message(glob, settings_to_config(SETTINGS)), context(rank=3))
    with pytest.raises(ValueError, match="do not match the global arrays"):
        compress_arrays(settings_to_config(SETTINGS), glob, {**glob, "extra": np.zeros(2)}, RecordDict())
    assert set(model_update(glob, glob)) == set(glob)


def run_rounds(strategy, nodes, rounds, lr=0.02, start=None):
    arrays = ArrayRecord({k: Array(v) for k, v in (start or initial_arrays()).items()})
    for rnd in range(1, rounds + 1):
        messages = strategy.configure_train(rnd, arrays, ConfigRecord({"lr": lr}), NodeGrid(nodes))
        replies = [APP(msg, nodes[msg.metadata.dst_node_id]) for msg in messages]
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["agg-clients-dropped"] == 0
    return {k: a.numpy().astype(np.float64) for k, a in arrays.items()}


def test_mixed_ranks_under_compression_match_the_uncompressed_run():
    """A rank-1 client beside rank-2 ones: its update is relative to the head it loaded."""
    make_nodes = lambda: {1: context(1, 0, rank=1), 2: context(2, 1), 3: context(3, 2)}  # noqa: E731
    lossless = LGreCo(FedLowRank(rank=2), candidates=["none"], default="none", warmup_rounds=10**9)
    compressed = run_rounds(lossless, make_nodes(), 3)
    plain = run_rounds(FedLowRank(rank=2), make_nodes(), 3)
    for key in plain:
        np.testing.assert_allclose(compressed[key], plain[key], atol=1e-5, err_msg=key)


def test_mixed_ranks_under_lossy_compression_leave_an_untrained_global_unchanged():
    nodes = {1: context(1, 0, rank=1), 2: context(2, 1), 3: context(3, 2)}
    rng = np.random.default_rng(0)
    start = initial_arrays()  # a trained global: U non-zero, two distinct singular values
    for module in ("net.0", "net.2"):
        start[f"{module}.lora_U"] = (rng.normal(size=start[f"{module}.lora_U"].shape) * [1.0, 0.3]).astype(np.float32)
    strategy = LGreCo(FedLowRank(rank=2), candidates=["sq:3"], default="sq:3", warmup_rounds=10**9)
    arrays = run_rounds(strategy, nodes, 2, lr=0.0, start=dict(start))
    start = {k: v.astype(np.float64) for k, v in start.items()}
    for module in ("net.0", "net.2"):
        product = lambda a: (a[f"{module}.lora_U"] * a[f"{module}.lora_S"][0]) @ a[f"{module}.lora_V"].T  # noqa: E731
        assert np.linalg.norm(product(arrays) - product(start)) <= 1e-5 * np.linalg.norm(product(start))


def test_missing_setting_is_an_error_and_leaves_state_as_it_was():
    glob = initial_arrays()
    state = RecordDict()
    partial = {k: v for k, v in SETTINGS.items() if k != "net.4.bias"}
    with pytest.raises(ValueError, match="No compression setting"):
        compress_arrays(settings_to_config(partial), glob, glob, state)
    assert EF_STATE_KEY not in state.array_records


def _replace_spec(arrays, name, line):
    """Swap the spec line of ``name`` (lines follow the sorted tensor names)."""
    lines = arrays[SPEC_KEY].tobytes().split(b"\n")
    lines[sorted(SETTINGS).index(name)] = line.encode("ascii")
    arrays[SPEC_KEY] = np.frombuffer(b"\n".join(lines), dtype=np.uint8).copy()


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        # The declared codec does not match what the server asked for (Top-K over QSGD fields).
        (lambda a: _replace_spec(a, "net.2.lora_U", "topk:0.25|16,2|"), "net.2.lora_U.*asked for 'qsgd:4'"),
        # The declared shape does not match the global tensor.
        (lambda a: _replace_spec(a, "net.0.lora_U", "powersgd:1|17,2|"), "net.0.lora_U.*shape"),
        # The declared setting does not match: density 0.25 declared, 0.5 asked for and sent.
        (lambda a: _replace_spec(a, "net.4.weight", "topk:0.25|1,16|"), "net.4.weight.*asked for 'topk:0.5'"),
        # An unknown codec.
        (lambda a: _replace_spec(a, "net.4.bias", "zip:3|1|"), "net.4.bias.*Unknown codec"),
        # Fields that do not fit the declared layout.
        (lambda a: a.update({PAYLOAD_KEY: a[PAYLOAD_KEY][:-1]}), "bytes, the specs declare"),
    ],
)
def test_payload_that_does_not_match_its_spec_is_rejected(tamper, match):
    glob = initial_arrays()
    shapes = {k: v.shape for k, v in glob.items()}
    sent = reply_arrays(APP(train_message(glob, settings_to_config(SETTINGS)), context()))
    decode_update(sent, shapes, SETTINGS)  # untouched: fine
    tamper(sent)
    with pytest.raises(ValueError, match=match):
        decode_update(sent, shapes, SETTINGS)


def accuracy(arrays):
    model = build_model(model_fn, ADAPTER, context())
    load_exchange_state(model, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    pred = predict(model, [b for p in range(3) for b in data_fn(context(partition=p)).test], torch.device("cpu"))
    return float(np.mean((pred.scores > 0.5) == pred.labels)), pred.loss


def test_lgreco_around_fedlowrank_trains_over_rounds_with_a_silent_client():
    """Five rounds through configure_train / ClientApp / aggregate_train.

    Node 3 strips its error tables from every reply: allocation must go on
    from the other two.
    """
    nodes = {n: context(node=n, partition=n - 1) for n in (1, 2, 3)}
    # Fixed schedule (no back-off): this test is about the silent client.
    strategy = LGreCo(
        FedLowRank(rank=2), candidates=CANDS, default="powersgd:1", reallocate_every=2, max_interval_factor=1,
        fallback_to_uniform=False,
    )
    arrays = ArrayRecord({k: Array(v) for k, v in initial_arrays().items()})
    start_acc, start_loss = accuracy({k: a.numpy() for k, a in arrays.items()})
    for rnd in range(1, 6):
        replies = []
        for msg in strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.02}), NodeGrid(nodes)):
            reply = APP(msg, nodes[msg.metadata.dst_node_id])
            if msg.metadata.dst_node_id == 3:
                reply.content["arrays"].pop(ERRORS_KEY, None)
                reply.content["arrays"].pop(ENERGY_KEY, None)
            replies.append(reply)
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["lgreco-dropped"] == 0 and len(metrics["lgreco-bytes-per-client"]) == 3
        assert np.isfinite(metrics["lgreco-residual-norm"])
    acc, loss = accuracy({k: a.numpy() for k, a in arrays.items()})
    assert sorted(strategy.allocation_history) == [1, 3, 5]
    assert np.isfinite(loss) and loss < start_loss and acc >= start_acc
    # Each client's state persisted across all rounds.
    assert all(c.state.array_records[EF_STATE_KEY]["meta"].numpy()[1] == 5 for c in nodes.values())


GROUPED = AdapterConfig(target_modules=r"net\.(0|2)", rank=2, groups=2, trainable=r"net\.4\..*")


def grouped_data_fn(context):
    """Two groups (sign of feature 1) with different decision rules."""
    gen = torch.Generator().manual_seed(200 + int(context.node_config.get("partition-id", 0)))
    x = torch.randn(96, 12, generator=gen)
    g = (x[:, 1] > 0).long()
    y = torch.where(g == 1, x[:, :3].sum(1) > 0, x[:, 3:6].sum(1) > 0).float()
    batches = [(x[i : i + 32], y[i : i + 32], g[i : i + 32]) for i in range(0, 96, 32)]
    return ClientData(train=batches, test=batches, num_groups=2)


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_lgreco_composes_with_fairlora(mode):
    """Compressed grouped factors decode into FairLoRA: one row of S per group survives, loss falls."""
    from fedlowrank.strategies import FairLoRA

    app = build_client_app(model_fn, grouped_data_fn, GROUPED, lr=0.02)
    nodes = {n: context(node=n, partition=n - 1) for n in (1, 2, 3)}
    strategy = LGreCo(FairLoRA(mode=mode, rank=2), default="sq:3", reallocate_every=2, max_interval_factor=1,
                      fallback_to_uniform=False)
    init = {k: a.numpy() for k, a in to_record(exchange_state(build_model(model_fn, GROUPED, context()))).items()}
    arrays = ArrayRecord({k: Array(v) for k, v in init.items()})

    def loss_of(record):
        model = build_model(model_fn, GROUPED, context())
        load_exchange_state(model, {k: torch.from_numpy(np.asarray(a.numpy())) for k, a in record.items()})
        batches = [b for p in range(3) for b in grouped_data_fn(context(partition=p)).test]
        return predict(model, batches, torch.device("cpu")).loss

    start = loss_of(arrays)
    for rnd in range(1, 5):
        replies = [app(msg, nodes[msg.metadata.dst_node_id]) for msg in strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.02}), NodeGrid(nodes))]
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["lgreco-dropped"] == 0 and metrics["lgreco-bytes"] < metrics["lgreco-raw-bytes"]
    assert sorted(strategy.allocation_history) == [1, 3]
    assert arrays["net.0.lora_S"].numpy().shape[0] == 2  # one row of singular values per group
    assert np.all(np.isfinite(arrays["net.0.lora_S"].numpy())) and loss_of(arrays) < start
