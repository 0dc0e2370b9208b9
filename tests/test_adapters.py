"""The SVD-factored adapter layer, injection and state I/O, against dense references."""

import pytest
import torch
from torch import nn

from fedlowrank.adapters import (
    SVDLinear,
    exchange_state,
    group_context,
    inject_adapters,
    load_exchange_state,
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 1))


def dense_delta(layer, row):
    return layer.scale * (layer.lora_U * row) @ layer.lora_V.T


def test_forward_equals_dense_weight_per_group():
    layer = SVDLinear(nn.Linear(10, 7), rank=3, groups=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_U.normal_()
        layer.lora_S.normal_()
        layer.group_share.copy_(torch.tensor([0.5, 0.3, 0.2]))
    x = torch.randn(6, 10)
    ids = torch.tensor([0, 1, 2, -1, 2, 0])
    with group_context(layer, ids):
        out = layer(x)
    for i, g in enumerate(ids.tolist()):
        row = layer.lora_S[g] if g >= 0 else layer.group_share @ layer.lora_S
        weight = layer.base.weight + dense_delta(layer, row)
        assert torch.allclose(out[i], x[i] @ weight.T + layer.base.bias, atol=1e-5)


def test_soft_assignment_mixes_rows():
    layer = SVDLinear(nn.Linear(4, 5), rank=2, groups=2)
    with torch.no_grad():
        layer.lora_U.normal_()
        layer.lora_S.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
    x = torch.randn(1, 4)
    with group_context(layer, torch.tensor([1]), own_weight=0.8):
        out = layer(x)
    row = 0.2 * layer.lora_S[0] + 0.8 * layer.lora_S[1]
    assert torch.allclose(out[0], x[0] @ (layer.base.weight + dense_delta(layer, row)).T + layer.base.bias, atol=1e-6)


def test_starts_equal_to_base_and_freezes_it():
    model = tiny_model()
    x = torch.randn(4, 10)
    before = model(x)
    names = inject_adapters(model, r"0|2", rank=2, trainable=r"4\..*")
    assert names == ["0", "2"]
    assert torch.allclose(model(x), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_U", "0.lora_S", "0.lora_V", "2.lora_U", "2.lora_S", "2.lora_V", "4.weight", "4.bias"}


def test_gradient_reaches_adapter_not_base():
    model = tiny_model()
    inject_adapters(model, r"0", rank=2)
    model(torch.randn(3, 10)).sum().backward()
    assert model[0].lora_U.grad is not None and model[0].lora_U.grad.abs().sum() > 0
    assert model[0].base.weight.grad is None


@pytest.mark.parametrize("receiver_rank", [2, 4, 7])
def test_state_round_trip_across_rank_and_scale(receiver_rank):
    sender = tiny_model()
    inject_adapters(sender, r"0|2", rank=4, alpha=8.0, trainable=r"4\..*")
    with torch.no_grad():
        for name, p in sender.named_parameters():
            if "lora" in name:
                p.normal_()
    receiver = tiny_model()
    inject_adapters(receiver, r"0|2", rank=receiver_rank, alpha=1.0, trainable=r"4\..*")
    state = exchange_state(sender)
    # The wire product is the sender's dW exactly.
    u, s, v = state["0.lora_U"], state["0.lora_S"], state["0.lora_V"]
    assert torch.allclose((u * s[0]) @ v.T, dense_delta(sender[0], sender[0].lora_S[0]), atol=1e-5)
    load_exchange_state(receiver, state)
    for idx in (0, 2):
        got = dense_delta(receiver[idx], receiver[idx].lora_S[0])
        full = dense_delta(sender[idx], sender[idx].lora_S[0])
        if receiver_rank >= 4:
            assert torch.allclose(got, full, atol=1e-5)
        else:  # the best approximation at the receiver's rank, not the first columns
            u_, s_, vt_ = torch.linalg.svd(full.detach().double())
            best = (u_[:, :receiver_rank] * s_[:receiver_rank]) @ vt_[:receiver_rank]
            assert torch.allclose(got.double(), best, atol=1e-4)
            first = sender[idx].scale * (sender[idx].lora_U[:, :receiver_rank] * sender[idx].lora_S[0, :receiver_rank]) @ sender[idx].lora_V[:, :receiver_rank].T
            assert not torch.allclose(got, first, atol=1e-2)
    assert torch.equal(receiver[4].weight, sender[4].weight)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="rank 9 must be between 1 and min"):
        SVDLinear(nn.Linear(8, 5), rank=9)
    model = tiny_model()
    with pytest.raises(ValueError, match="no adaptable module matches"):
        inject_adapters(model, r"encoder\..*", rank=2)
    inject_adapters(model, r"0", rank=2, groups=2)
    with pytest.raises(ValueError, match="group ids must be in 0..1"):
        with group_context(model, torch.tensor([0, 2])):
            pass
    with pytest.raises(ValueError, match="integer tensor"):
        with group_context(model, torch.tensor([0.0, 1.0])):
            pass
    with group_context(model, torch.tensor([0, 1, 1])):
        with pytest.raises(ValueError, match="group weights have shape"):
            model(torch.randn(2, 10))
    state = exchange_state(model)
    state["0.lora_U"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="do not fit"):
        load_exchange_state(model, state)
    del state["0.lora_V"]
    with pytest.raises(KeyError, match="missing"):
        load_exchange_state(model, state)


def test_loading_an_adapter_into_a_model_without_adapters_names_the_fix(tmp_path):
    from fedlowrank.adapters import load_adapter, save_adapter

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    adapted = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    inject_adapters(adapted, r"^0$", rank=2)
    path = save_adapter(tmp_path / "a.adapter.safetensors", {k: v.numpy() for k, v in exchange_state(adapted).items()},
                        {"rank": 2})
    with pytest.raises(ValueError, match=r"no adapters .* inject them first .*rank=2"):
        load_adapter(model, path)
    inject_adapters(model, r"^0$", rank=2)
    assert load_adapter(model, path) == {"rank": 2}
