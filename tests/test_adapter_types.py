"""Adapters by base layer type: conv (1d/2d/3d), GPT-2 Conv1D, and where injection refuses.

Each adapter's forward equals the base layer run with the dense-merged weight (an
independent reference built from ``delta_weight``), its per-sample gradients equal a
per-example backward loop, and its wire state round-trips.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlowrank.adapters import (
    SVDConv,
    SVDConv1D,
    adapter_layers,
    exchange_state,
    group_context,
    inject_adapters,
    load_exchange_state,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")

CONVS = [
    (nn.Conv1d(3, 5, 3, stride=2, padding=1), (4, 3, 11)),
    (nn.Conv2d(3, 6, (3, 2), padding="same", dilation=(1, 2)), (4, 3, 7, 8)),
    (nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect"), (4, 3, 9, 9)),
    (nn.Conv3d(2, 4, 3, padding=(1, 0, 1)), (4, 2, 5, 6, 5)),
]


def randomise(layer) -> None:
    """Non-trivial factors (U = 0 at init would make every check pass trivially)."""
    with torch.no_grad():
        layer.lora_U.normal_(0.0, 0.5)
        layer.lora_S.uniform_(0.5, 1.5)


def merged(conv: nn.Module, delta: torch.Tensor) -> nn.Module:
    """A copy of ``conv`` whose weight has ``delta`` added: the dense reference."""
    dense = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                       padding_mode=conv.padding_mode).double()
    with torch.no_grad():
        dense.weight.copy_(conv.weight.double() + delta.double())
        if conv.bias is not None:
            dense.bias.copy_(conv.bias.double())
    return dense


@pytest.mark.parametrize("conv,shape", CONVS, ids=["conv1d", "conv2d-same-dilated", "conv2d-reflect", "conv3d"])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_forward_equals_dense_merged_conv(conv, shape, groups):
    torch.manual_seed(0)
    conv = conv.double()
    layer = SVDConv(conv, rank=3, groups=groups, alpha=6.0)
    randomise(layer)
    x = torch.randn(*shape, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 0]) % groups
    with group_context(layer, ids):
        got = layer(x)
    for g in range(groups):
        want = merged(conv, layer.delta_weight(g))(x)
        rows = ids == g
        torch.testing.assert_close(got[rows], want[rows], rtol=1e-10, atol=1e-10)
    # An unbatched input takes the same path.
    torch.testing.assert_close(layer(x[0]), merged(conv, layer.delta_weight())(x[:1])[0], rtol=1e-10, atol=1e-10)


def test_conv_fold_is_applied_like_a_merged_kernel():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, padding=1).double()
    layer = SVDConv(conv, rank=2)
    fold_u, fold_v = torch.randn(4, 3, dtype=torch.float64), torch.randn(18, 3, dtype=torch.float64)
    layer.set_fold(fold_u, fold_v)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    want = merged(conv, (fold_u @ fold_v.T).reshape(conv.weight.shape))(x)  # U = 0: only the fold
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_gpt2_conv1d_forward_equals_dense_merged_layer():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    base = Conv1D(nf=7, nx=5).double()
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    model = nn.Sequential(base)
    assert inject_adapters(model, "0", rank=3, alpha=1.5) == ["0"]
    layer = model[0]
    assert isinstance(layer, SVDConv1D) and (layer.in_features, layer.out_features) == (5, 7)
    randomise(layer)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    want = x @ (base.weight + layer.delta_weight()) + base.bias  # Conv1D's own layout: y = x W + b
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_conv_exchange_state_round_trips_into_a_model_of_another_rank():
    torch.manual_seed(3)
    sender = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
    receiver = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
    receiver.load_state_dict(sender.state_dict())
    inject_adapters(sender, r"[02]", rank=4)
    inject_adapters(receiver, r"[02]", rank=6)
    for layer in adapter_layers(sender).values():
        randomise(layer)
    load_exchange_state(receiver, exchange_state(sender))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(receiver(x), sender(x), rtol=1e-5, atol=1e-5)


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 3, 2, stride=2)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.c1(x))  # (N, 4, H, W)
        h = torch.tanh(self.c2(h.flatten(2)))  # (N, 3, L)
        return self.head(h.mean(-1))


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_and_conv1d_per_sample_gradients_match_a_per_example_loop(groups):
    pytest.importorskip("opacus")
    from fedlowrank.privacy import wrap_model

    torch.manual_seed(4)
    model = TwoConv().double()
    inject_adapters(model, r"c[12]", rank=2, groups=groups, alpha=4.0, trainable=r"head\..*")
    for layer in adapter_layers(model).values():
        randomise(layer)
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    ids = torch.tensor([0, 1, -1, 1, 0]) % groups if groups > 1 else torch.zeros(5, dtype=torch.long)
    wrapped = wrap_model(model, loss_reduction="sum")
    with group_context(model, ids):
        loss = nn.functional.cross_entropy(wrapped(x), y, reduction="sum")
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per_sample = {n: p.grad_sample.clone() for n, p in trainable.items()}
    for i in range(5):
        model.zero_grad()
        with group_context(model, ids[i : i + 1]):
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for name, param in trainable.items():
            torch.testing.assert_close(per_sample[name][i], param.grad, rtol=1e-8, atol=1e-10, msg=name)
    assert {"c1.lora_U", "c1.lora_S", "c1.lora_V", "c2.lora_V", "head.weight"} <= set(per_sample)


def test_gpt2_conv1d_per_sample_gradients_match_a_per_example_loop():
    pytest.importorskip("opacus")
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from fedlowrank.privacy import wrap_model

    torch.manual_seed(5)
    model = nn.Sequential(Conv1D(nf=6, nx=4), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)).double()
    inject_adapters(model, "0", rank=2, trainable=r"3\..*")
    randomise(model[0])
    x, y = torch.randn(4, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    wrapped = wrap_model(model, loss_reduction="sum")
    nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    per_sample = model[0].lora_V.grad_sample.clone()
    for i in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        torch.testing.assert_close(per_sample[i], model[0].lora_V.grad, rtol=1e-8, atol=1e-10)


def test_unsupported_targets_are_named_with_their_type():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match=r"groups = 4"):
        inject_adapters(model, "0", rank=1)
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d\): .*BatchNorm2d has no adapter type"):
        inject_adapters(model, "1", rank=1)
    with pytest.raises(ValueError, match="no adaptable module matches"):
        inject_adapters(model, "2", rank=1)  # an activation only: nothing meant to adapt
    attention = nn.Module()
    attention.mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="mha.out_proj .*reads? out_proj|uses out_proj's weight"):
        inject_adapters(attention, r"mha\.out_proj", rank=2)


def test_a_peft_model_is_not_wrapped_again():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="PEFT LoRA model"):
        inject_adapters(model, r".*", rank=2)
