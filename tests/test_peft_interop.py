"""PEFT LoRA models as clients: read exactly, aggregated exactly, written back into PEFT.

The reference is independent of fedlowrank's factor algebra: PEFT's own
``get_delta_weight`` on each client, summed densely with the weights, truncated by a
dense SVD.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedlowrank.adapters import exchange_state, load_exchange_state
from fedlowrank.adapters.peft import lora_layers, save_peft_adapter
from fedlowrank.strategies import FedLowRank
from fedlowrank.strategies.testing import configure_round, run_round, train_reply

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

WEIGHTS = [30.0, 50.0, 20.0]
GLOBAL_RANK = 4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2)).double()


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)
    return transformers.GPT2LMHeadModel(config).double()


# Mixed r, lora_alpha, rank_pattern / alpha_pattern and rsLoRA across the three clients (each at
# most the global rank: a reply above it is dropped by the strategy, tested elsewhere).
MLP_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=["0", "2"]),
    dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["0", "2"]),
    dict(r=3, lora_alpha=3, target_modules=["0", "2"], rank_pattern={"2": 1}, alpha_pattern={"2": 7}),
]
GPT2_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    dict(r=2, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
         rank_pattern={"c_proj": 1}, alpha_pattern={"c_proj": 2}),
]
CASES = {"linear": (mlp, MLP_CONFIGS), "gpt2-conv1d": (gpt2, GPT2_CONFIGS)}


def peft_client(build, config: dict, seed: int) -> nn.Module:
    model = get_peft_model(build(), LoraConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A["default"].weight.normal_()
            layer.lora_B["default"].weight.normal_()  # PEFT starts B = 0: make it a trained one
    return model


def matrix_deltas(model: nn.Module) -> dict[str, np.ndarray]:
    """PEFT's own delta per layer as a d_out x d_in matrix (Conv1D's is stored transposed)."""
    out = {}
    for name, layer in lora_layers(model).items():
        delta = layer.get_delta_weight("default").detach().numpy()
        out[name] = delta.T if layer.fan_in_fan_out else delta
    return out


def best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize("case", sorted(CASES))
def test_three_peft_clients_aggregate_to_the_best_approximation_of_the_weighted_sum(case):
    build, configs = CASES[case]
    clients = [peft_client(build, config, seed) for seed, config in enumerate(configs)]
    # The global starts at zero adapters, so no client's completion adds a tail.
    receiver = get_peft_model(build(), LoraConfig(**{**configs[0], "r": GLOBAL_RANK, "rank_pattern": {}, "alpha_pattern": {}}))
    start = {k: v.numpy() for k, v in exchange_state(receiver).items()}
    assert all(not np.any(start[k]) for k in start if k.endswith(".lora_U"))
    strategy = FedLowRank(rule="exact", rank=GLOBAL_RANK)
    replies = [
        train_reply(i + 1, {k: v.numpy() for k, v in exchange_state(client).items()}, w, dtype=np.float64)
        for i, (client, w) in enumerate(zip(clients, WEIGHTS))
    ]
    record, _ = run_round(strategy, start, replies, dtype=np.float64)
    assert record is not None

    load_exchange_state(receiver, {k: torch.from_numpy(record[k].numpy()) for k in record.keys()})
    got = matrix_deltas(receiver)
    deltas = [matrix_deltas(c) for c in clients]
    assert set(got) == set(deltas[0]) and len(got) >= 2
    for name in got:
        mean = sum(w * d[name] for w, d in zip(WEIGHTS, deltas)) / sum(WEIGHTS)
        want = best_rank(mean, GLOBAL_RANK)
        # The sum has rank up to 4 + 2 + 3 (or more), so the truncation matters.
        assert np.linalg.matrix_rank(mean) > GLOBAL_RANK
        assert np.linalg.norm(got[name] - want) / np.linalg.norm(want) < 1e-6, name


def test_a_client_reads_its_own_delta_exactly():
    client = peft_client(mlp, MLP_CONFIGS[2], seed=3)
    state = exchange_state(client)
    for name, delta in matrix_deltas(client).items():
        u, s, v = (state[f"{name}.{leaf}"].numpy() for leaf in ("lora_U", "lora_S", "lora_V"))
        np.testing.assert_allclose((u * s) @ v.T, delta, rtol=1e-12, atol=1e-12)


def test_the_aggregate_saves_as_a_peft_adapter_directory(tmp_path):
    client = peft_client(mlp, MLP_CONFIGS[0], seed=1)
    state = exchange_state(client)
    target = get_peft_model(mlp(), LoraConfig(**MLP_CONFIGS[0]))
    directory = save_peft_adapter(target, state, tmp_path / "global-adapter")
    assert (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(mlp(), str(directory))
    for name, delta in matrix_deltas(loaded).items():
        np.testing.assert_allclose(delta, matrix_deltas(client)[name], rtol=1e-10, atol=1e-12)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), client(x))


def test_what_peft_cannot_hold_is_refused():
    model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"]))
    state = exchange_state(model)
    grouped = {**state, "base_model.model.0.lora_S": torch.ones(2, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="2 group rows; a PEFT LoRA layer holds one"):
        load_exchange_state(model, grouped)
    folded = {**state, "base_model.model.0.fold_U": torch.zeros(10, 1), "base_model.model.0.fold_V": torch.zeros(12, 1)}
    with pytest.raises(ValueError, match="fold factors .* cannot load into a PEFT model"):
        load_exchange_state(model, folded)
    dora = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="uses DoRA"):
        exchange_state(dora)


def test_initial_arrays_of_a_peft_model_are_exact_factors():
    from fedlowrank.strategies import initial_arrays

    model = peft_client(mlp, MLP_CONFIGS[1], seed=2)
    record = initial_arrays(model)
    assert not any(".lora_A" in k or ".lora_B" in k for k in record.keys())
    strategy = FedLowRank(rule="exact", rank=2)
    configure_round(strategy, record)  # accepted: these are factors, not PEFT's raw A and B
    u, s, v = (record[f"base_model.model.0.{leaf}"].numpy() for leaf in ("lora_U", "lora_S", "lora_V"))
    np.testing.assert_allclose((u * s) @ v.T, matrix_deltas(model)["base_model.model.0"], rtol=1e-5, atol=1e-6)


def test_raw_peft_state_dicts_are_refused_by_the_strategy_with_the_way_out():
    model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"]))
    raw = {n: p.detach().numpy() for n, p in model.named_parameters() if p.requires_grad}
    strategy = FedLowRank(rule="exact", rank=2)
    with pytest.raises(ValueError, match=r"exchange_state\(peft_model\)"):
        configure_round(strategy, raw, dtype=np.float64)  # before any client trains


def test_a_peft_model_trains_in_the_client_builder(monkeypatch):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, to_record

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)

    def model_fn(context):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], modules_to_save=["2"]))

    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    data = ClientData([(x, y, torch.zeros(16, dtype=torch.long))], [(x, y, torch.zeros(16, dtype=torch.long))])
    app = build_client_app(model_fn, lambda ctx: data, AdapterConfig(target_modules="unused", rank=2), lr=0.1)
    start = exchange_state(model_fn(None))
    msg = Message(content=RecordDict({"arrays": to_record(start), "config": ConfigRecord({"lr": 0.1})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    reply = app(msg, Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}))
    arrays = reply.content["arrays"]
    assert set(arrays.keys()) == set(start)
    moved = [k for k in start if not np.allclose(arrays[k].numpy(), start[k].numpy())]
    assert "base_model.model.0.lora_U" in moved and any("modules_to_save" in k for k in moved)

    ctx = Context(run_id=1, node_id=1, node_config={"rank": 4}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=r"node config rank = 4, but the PEFT model's LoRA ranks are \[2\]"):
        app(msg, ctx)
