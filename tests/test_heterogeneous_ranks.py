"""Clients of different ranks: a round in which nobody learns changes nothing, and nothing decays."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from torch import nn

from fedlowrank.adapters import exchange_state, inject_adapters, load_exchange_state
from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, to_record
from fedlowrank.strategies import FedLowRank
from fedlowrank.strategies.testing import InProcessGrid, run_round, train_reply

RANKS = (2, 4, 8)
GLOBAL_RANK = 8


def make_model(rank, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 1)).to(dtype)
    inject_adapters(model, r"0|2", rank=rank, trainable=r"4\..*")
    return model


def products(arrays):
    out = {}
    for key in arrays:
        if key.endswith(".lora_U"):
            m = key[: -len(".lora_U")]
            out[m] = (arrays[f"{m}.lora_U"] * arrays[f"{m}.lora_S"][0]) @ arrays[f"{m}.lora_V"].T
    return out


def random_global(seed):
    """A rank-8 global adapter with spread singular values (what training leaves behind)."""
    gen = torch.Generator().manual_seed(seed)
    model = make_model(GLOBAL_RANK)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_U" in name or "lora_V" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * torch.linspace(1.5, 0.2, p.shape[1], dtype=p.dtype))
    return {k: v.numpy() for k, v in exchange_state(model).items()}


def echo_replies(global_arrays, ranks, counts):
    """Each client loads the global at its rank (the library's client path) and sends it back."""
    replies = []
    for node, (rank, count) in enumerate(zip(ranks, counts), start=1):
        model = make_model(rank)
        load_exchange_state(model, {k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()})
        state = {k: v.numpy() for k, v in exchange_state(model).items()}
        replies.append(train_reply(node, state, count, dtype=np.float64))
    return replies


@pytest.mark.parametrize("rule", ["exact", "flexlora-dense"])
def test_untrained_clients_of_mixed_ranks_leave_the_global_unchanged_for_ten_rounds(rule):
    start = random_global(0)
    arrays = start
    strategy = FedLowRank(rule=rule)
    for server_round in range(1, 11):
        record, metrics = run_round(strategy, arrays, echo_replies(arrays, RANKS, [30, 50, 20]), server_round=server_round, dtype=np.float64)
        arrays = {k: record[k].numpy() for k in record.keys()}
        assert metrics["agg-clients-dropped"] == 0
    for module, want in products(start).items():
        got = products(arrays)[module]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6, module
    np.testing.assert_allclose(arrays["4.weight"], start["4.weight"], rtol=1e-12)


def test_without_completion_the_same_round_erodes_the_global():
    """The failure the completion fixes (raFLoRA's rank collapse): zeros for what low ranks miss."""
    start = random_global(1)
    shares = np.array([30, 50, 20]) / 100
    moved = {}
    for module, g in products(start).items():
        u, s, vt = np.linalg.svd(g)
        naive = sum(w * (u[:, :r] * s[:r]) @ vt[:r] for w, r in zip(shares, RANKS))
        moved[module] = np.linalg.norm(naive - g) / np.linalg.norm(g)
    assert min(moved.values()) > 0.05, moved


def test_low_rank_client_loads_the_best_approximation_at_its_rank():
    start = random_global(2)
    model = make_model(2)
    load_exchange_state(model, {k: torch.from_numpy(v) for k, v in start.items()})
    loaded = {k: v.numpy() for k, v in exchange_state(model).items()}
    for module, g in products(start).items():
        u, s, vt = np.linalg.svd(g)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(products(loaded)[module], best, atol=1e-10)


def test_each_client_changes_the_global_by_its_own_update_only():
    """One client of rank 2 moves its head by D; the others echo: the global moves by w * D."""
    start = random_global(3)
    replies = echo_replies(start, RANKS, [30, 50, 20])
    model = make_model(2)
    load_exchange_state(model, {k: torch.from_numpy(v) for k, v in start.items()})
    with torch.no_grad():
        model[0].lora_U.add_(0.1)
    trained = {k: v.numpy() for k, v in exchange_state(model).items()}
    delta = products(trained)["0"] - (lambda g: (lambda u, s, vt: (u[:, :2] * s[:2]) @ vt[:2])(*np.linalg.svd(g)))(products(start)["0"])
    replies[0] = train_reply(1, trained, 30, dtype=np.float64)
    strategy = FedLowRank(rule="exact", rank=16)  # room for the sum: nothing truncated
    record, _ = run_round(strategy, start, replies, dtype=np.float64)
    got = products({k: record[k].numpy() for k in record.keys()})["0"]
    want = products(start)["0"] + 0.3 * delta
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-9


def test_rank_above_the_global_and_fedit_with_mixed_ranks_are_dropped_by_name(caplog):
    start = random_global(4)
    big = make_model(12)
    load_exchange_state(big, {k: torch.from_numpy(v) for k, v in start.items()})
    replies = echo_replies(start, (8, 8), [10, 10]) + [train_reply(9, {k: v.numpy() for k, v in exchange_state(big).items()}, 10, dtype=np.float64)]
    strategy = FedLowRank()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = run_round(strategy, start, replies, dtype=np.float64)
    assert metrics["agg-clients-dropped"] == 1
    assert any("node 9" in r.getMessage() and "rank 12 is above the global rank 8" in r.getMessage() for r in caplog.records)
    caplog.clear()
    fedit = FedLowRank(rule="fedit")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = run_round(fedit, start, echo_replies(start, (8, 4), [10, 10]), dtype=np.float64)
    assert metrics["agg-clients-dropped"] == 1
    assert any("node 2" in r.getMessage() and "cannot mix ranks" in r.getMessage() for r in caplog.records)


def test_unknown_rule_and_carry_on_a_non_exact_rule_are_refused():
    with pytest.raises(ValueError, match="unknown aggregation rule 'exactly'.*registered rules"):
        FedLowRank(rule="exactly")
    with pytest.raises(ValueError, match="needs an exact rule"):
        FedLowRank(rule="fedit", residual="carry")


# --------------------------------------------------------------------------- real training

D_IN, SITES, ROUNDS = 10, 3, 8


def site_data(partition):
    gen = torch.Generator().manual_seed(100 + partition)
    x = torch.randn(256, D_IN, generator=gen)
    # Each site's label depends on its own mix of directions: the sum has rank > 2.
    w = torch.randn(D_IN, generator=gen)
    y = (x @ w + 0.5 * x[:, partition] > 0).long()
    batches = [(x[i : i + 64], y[i : i + 64], torch.zeros(64, dtype=torch.long)) for i in range(0, 256, 64)]
    return ClientData(train=batches, test=batches, num_groups=1)


def base_model(context=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, 1))


def test_energy_beyond_the_smallest_rank_does_not_decay_in_a_real_run():
    """Clients of rank 2, 4, 8 train for real; the global's energy past rank 2 must hold."""
    torch.set_num_threads(1)
    adapter = AdapterConfig(target_modules=r"^0$", rank=GLOBAL_RANK, trainable=r"^2\..*")
    app = build_client_app(base_model, lambda ctx: site_data(int(ctx.node_config["partition-id"])), adapter, lr=0.005)
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)], {"client-ranks": "2,4,8"})
    model = base_model()
    inject_adapters(model, adapter.target_modules, rank=GLOBAL_RANK, trainable=adapter.trainable)
    with torch.no_grad():  # a global adapter earlier rounds trained, with energy in all 8 directions
        gen = torch.Generator().manual_seed(7)
        model[0].lora_U.copy_(0.3 * torch.randn(model[0].lora_U.shape, generator=gen))
    tails = []

    def record(server_round, arrays):
        state = {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}
        s = np.linalg.svd(products(state)["0"], compute_uv=False)
        tails.append(float(np.sum(s[2:GLOBAL_RANK] ** 2)))
        return None

    FedLowRank(fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=to_record(exchange_state(model)), num_rounds=ROUNDS,
        train_config=ConfigRecord({"local-epochs": 1}), evaluate_fn=record,
    )
    tails = np.array(tails)
    assert tails[0] > 0
    # Counting what low-rank clients miss as zero shrinks this energy geometrically (measured:
    # 2.6x in round 1, 190x by round 8); with completion no round loses more than training moves it.
    assert np.all(tails[1:] >= 0.8 * tails[:-1]), tails
    assert tails[-1] >= 0.8 * tails[0], tails


def test_ffa_clients_keep_v_frozen_through_the_real_client_app():
    """The server tells clients to freeze lora_V; their replies then pass the rule's check."""
    torch.set_num_threads(1)
    adapter = AdapterConfig(target_modules=r"^0$", rank=4, trainable=r"^2\..*")
    app = build_client_app(base_model, lambda ctx: site_data(int(ctx.node_config["partition-id"])), adapter, lr=0.01)
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)], {"client-ranks": "2,4,4"})
    model = base_model()
    inject_adapters(model, adapter.target_modules, rank=4, trainable=adapter.trainable)
    start = to_record(exchange_state(model))
    result = FedLowRank(rule="ffa", fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=start, num_rounds=3, train_config=ConfigRecord({"local-epochs": 1}),
    )
    for server_round in (1, 2, 3):
        train = result.train_metrics_clientapp[server_round]
        assert train["agg-clients-dropped"] == 0 and train["agg-error-rel"] < 1e-5  # FFA is exact
    np.testing.assert_array_equal(result.arrays["0.lora_V"].numpy(), start["0.lora_V"].numpy())
    assert np.abs(result.arrays["0.lora_U"].numpy()).max() > 0


def test_rank_reaches_clients_from_node_config_then_client_ranks_then_run_config():
    from flwr.app import Context, RecordDict

    from fedlowrank.clients import client_rank

    def ctx(node_config, run_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)

    assert client_rank(ctx({"rank": 3, "partition-id": 1}, {"client-ranks": "2,4", "rank": 8}), 4) == 3
    assert client_rank(ctx({"partition-id": 1}, {"client-ranks": "2,4", "rank": 8}), 4) == 4
    assert client_rank(ctx({"partition-id": 1}, {"client-ranks": "", "rank": 8}), 4) == 8  # was the app's 4
    assert client_rank(ctx({"partition-id": 1}, {}), 4) == 4
    with pytest.raises(ValueError, match="comma-separated integers"):
        client_rank(ctx({"partition-id": 0}, {"client-ranks": "2,four"}), 4)
