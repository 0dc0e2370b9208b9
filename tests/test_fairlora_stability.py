"""FairLoRA over many rounds with Adam clients: the real ClientApp and strategy, in one process."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, to_record
from fedlowrank.adapters import exchange_state, inject_adapters
from fedlowrank.strategies import FairLoRA, FederatedFairnessMetrics
from fedlowrank.strategies.testing import InProcessGrid

ROUNDS, SITES, RANK, GROUPS, FEATURES = 32, 4, 3, 2, 6


def base_model():
    torch.manual_seed(123)  # every node builds the same frozen base
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def site_data(partition, seed=0):
    """Groups whose best predictors differ; sites differ in group mix."""
    rng = np.random.default_rng(seed + partition)
    n = 160
    groups = (rng.random(n) < 0.2 + 0.2 * partition).astype(np.int64)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    w = np.where(groups[:, None] == 0, [1.5, -1, 0, 0, 0.5, 0], [0, 0, 1.5, -1, 0.5, 0])
    y = ((x * w).sum(1) + 0.3 * rng.standard_normal(n) > 0).astype(np.float32)
    tensors = (torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(groups))
    train = TensorDataset(*(t[:120] for t in tensors))
    test = TensorDataset(*(t[120:] for t in tensors))
    generator = torch.Generator().manual_seed(partition)
    return ClientData(DataLoader(train, 24, shuffle=True, generator=generator), DataLoader(test, 64), GROUPS)


def product_norms(arrays):
    """Largest ||U diag(S[g]) V^T|| over layers and groups, and the largest factor entry."""
    state = {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}
    norms, entries = [], []
    for key in state:
        if key.endswith(".lora_U"):
            m = key[: -len(".lora_U")]
            u, s, v = state[f"{m}.lora_U"], state[f"{m}.lora_S"], state[f"{m}.lora_V"]
            norms += [np.linalg.norm(u @ np.diag(s[g]) @ v.T) for g in range(s.shape[0])]
            entries += [np.abs(t).max() for t in (u, s, v)]
    return max(norms), max(entries)


@pytest.mark.parametrize("mode,cap", [("exact", None), ("exact", 1.0), ("paper", None)])
def test_fairlora_stays_stable_over_many_rounds_with_adam(mode, cap):
    torch.set_num_threads(1)
    adapter = AdapterConfig(target_modules=r"^(0|2)$", rank=RANK, groups=GROUPS, trainable=r"^4\..*")
    app = build_client_app(lambda ctx: base_model(), lambda ctx: site_data(int(ctx.node_config["partition-id"])),
                           adapter, lr=0.02)
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)], {})
    model = base_model()
    inject_adapters(model, adapter.target_modules, rank=RANK, groups=GROUPS, trainable=adapter.trainable)
    history = []

    def record(server_round, arrays):
        history.append(product_norms(arrays))
        return None

    strategy = FairLoRA(mode=mode, rank=RANK, fraction_evaluate=1.0, balance_cap=cap,
                        evaluate_metrics_aggr_fn=FederatedFairnessMetrics(num_groups=GROUPS))
    result = strategy.start(grid=grid, initial_arrays=to_record(exchange_state(model)), num_rounds=ROUNDS,
                            train_config=ConfigRecord({"local-epochs": 1}), evaluate_fn=record)

    norms = np.array([n for n, _ in history[1:]])
    entries = np.array([e for _, e in history[1:]])
    assert np.isfinite(norms).all() and np.isfinite(entries).all()
    # Bounded: the measured failure mode grew adapter norms 1000x in 20 rounds. Here the
    # last ten rounds stay within 3x of the largest norm seen in the first ten.
    assert norms[-10:].max() <= 3.0 * norms[:10].max(), norms
    assert entries.max() < 20.0
    final = result.evaluate_metrics_clientapp[ROUNDS]
    for key in ("fed-auc", "fed-es_auc", "fed-dpd", "fed-eod", "fed-auc_g0", "fed-auc_g1"):
        assert math.isfinite(final[key]), key
    assert final["fed-auc"] > 0.75  # the adapters learned the per-group task
    train = result.train_metrics_clientapp[ROUNDS]
    assert train["agg-clients-dropped"] == 0 and math.isfinite(train["agg-error-rel"])
    if cap is not None:
        assert np.abs(result.arrays["0.lora_S"].numpy()).max() <= cap + 1e-5
