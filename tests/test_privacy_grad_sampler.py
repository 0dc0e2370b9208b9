"""Per-sample gradients on the DP path equal a per-example backward loop.

Covers the SVDLinear grad sampler (G = 1 and G = 3 with hard, soft, unknown and
free-form group weights; 2-D and 3-D inputs; backward inside or after the group
context) and PEFT LoRA models, whose A/B ``nn.Linear`` layers use Opacus' own rule.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

pytest.importorskip("opacus")

from opacus.grad_sample import GradSampleModule  # noqa: E402

from fedlowrank.adapters import SVDLinear, group_context, inject_adapters  # noqa: E402
from fedlowrank.privacy import (  # noqa: E402
    compute_svd_linear_grad_sample,
    validate_model,
    wrap_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")

TOL = 1e-6


class Net(nn.Module):
    """Two adapted layers and a trainable head; mean over the sequence for 3-D input."""

    def __init__(self, d_in: int = 6, hidden: int = 8, out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        if h.dim() == 3:
            h = h.mean(dim=1)
        return self.head(h)


def adapted_net(groups: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    inject_adapters(model, r"fc\d", rank=3, groups=groups, alpha=6.0, trainable=r"head\..*")
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            # Non-trivial factors, so every factor has a non-zero gradient.
            layer.lora_U.normal_(0.0, 0.5)
            layer.lora_S.uniform_(0.5, 1.5)
            layer.group_share.copy_(torch.softmax(torch.randn(groups), 0))
    return model


@contextmanager
def free_weights(model: nn.Module, weights: torch.Tensor):
    """Arbitrary per-row convex weights (beyond what group ids can express)."""
    layers = [m for m in model.modules() if isinstance(m, SVDLinear)]
    try:
        for layer in layers:
            layer.group_weights = weights
        yield
    finally:
        for layer in layers:
            layer.group_weights = None


def routing(model, mode, ids, weights):
    if mode == "none":
        return contextmanager(lambda: (yield))()
    if mode == "hard":
        return group_context(model, ids)
    if mode == "soft":
        return group_context(model, ids, own_weight=0.7)
    return free_weights(model, weights)


def per_example_grads(model, x, y, mode, ids, weights):
    """Reference: one backward per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        w = None if weights is None else weights[n : n + 1]
        with routing(model, mode, ids[n : n + 1], w):
            loss = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
        loss.backward()
        rows.append([p.grad.detach().clone() for p in params])
    return [torch.stack([r[i] for r in rows]) for i in range(len(params))]


def dp_grads(model, x, y, mode, ids, weights, backward_inside: bool):
    gsm = wrap_model(model)
    with routing(gsm, mode, ids, weights):
        loss = nn.functional.cross_entropy(gsm(x), y)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        # As fedlowrank.training does: the context has exited before backward.
        loss.backward()
    out = [p.grad_sample.detach().clone() for p in model.parameters() if p.requires_grad]
    gsm.to_standard_module()
    return out


CASES = [
    (1, "none"),
    (1, "hard"),
    (3, "none"),
    (3, "hard"),
    (3, "soft"),
    (3, "free"),
]


@pytest.mark.parametrize("seq", [None, 4], ids=["2d", "3d"])
@pytest.mark.parametrize("groups,mode", CASES)
@pytest.mark.parametrize("backward_inside", [False, True], ids=["after", "inside"])
def test_svd_linear_per_sample_grads_match_loop(groups, mode, seq, backward_inside):
    torch.manual_seed(1)
    batch = 7
    shape = (batch, 6) if seq is None else (batch, seq, 6)
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (batch,))
    # Unknown rows (-1) use the group-share mix of S.
    ids = torch.tensor([0, 1, 2, -1, 1, 0, 2] if groups == 3 else [0, 0, -1, 0, 0, -1, 0])
    weights = None
    if mode == "free":
        weights = torch.distributions.Dirichlet(torch.ones(groups)).sample((batch,))

    expected = per_example_grads(adapted_net(groups), x, y, mode, ids, weights)
    got = dp_grads(adapted_net(groups), x, y, mode, ids, weights, backward_inside)
    assert len(got) == len(expected) == 8  # U, V, S of two layers + head weight, bias
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert (g - e).abs().max().item() <= TOL
    # The S gradients are really per group: not all zero, and rows differ by group.
    assert expected[2].abs().sum() > 0


def test_grad_sampler_is_registered_and_base_gets_none():
    assert GradSampleModule.GRAD_SAMPLERS[SVDLinear] is compute_svd_linear_grad_sample
    model = adapted_net(3)
    gsm = wrap_model(model)
    x = torch.randn(5, 6)
    with group_context(gsm, torch.tensor([0, 1, 2, 0, 1])):
        out = gsm(x)
    out.sum().backward()
    assert model.fc1.base.weight.grad is None
    assert not hasattr(model.fc1.base.weight, "grad_sample")
    assert model.fc1.lora_S.grad_sample.shape == (5, 3, 3)
    gsm.to_standard_module()


def test_grouped_layer_without_recorded_weights_is_refused():
    model = adapted_net(3)
    # Plain Opacus wrapper (the buffer rule off) without our group-weight tracking.
    gsm = GradSampleModule(model, strict=False)
    with group_context(gsm, torch.tensor([0, 1, 2])):
        loss = gsm(torch.randn(3, 6)).sum()
    with pytest.raises(ValueError, match="group weights of the forward were not recorded"):
        loss.backward()


def test_plain_opacus_strict_refuses_the_buffer_and_validate_allows_it():
    model = adapted_net(3)
    with pytest.raises(NotImplementedError, match="buffers"):
        GradSampleModule(model)
    validate_model(model)  # group_share is a constant: allowed


def test_validate_model_refuses_mixing_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD"):
        validate_model(model)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        validate_model(frozen)


def test_eval_forwards_record_nothing():
    model = adapted_net(3)
    gsm = wrap_model(model)
    gsm.eval()
    with torch.no_grad(), group_context(gsm, torch.tensor([0, 1])):
        gsm(torch.randn(2, 6))
    assert not getattr(model.fc1, "activations", [])
    gsm.train()
    with group_context(gsm, torch.tensor([2, 1])):
        loss = gsm(torch.randn(2, 6)).sum()
    loss.backward()
    assert model.fc1.lora_S.grad_sample.shape == (2, 3, 3)
    gsm.to_standard_module()


# ------------------------------------------------------------------------ PEFT LoRA


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.tanh(self.fc1(x)))
        return h.mean(dim=1) if h.dim() == 3 else h


def peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=0.0)
    model = peft.get_peft_model(Mlp(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # B starts at zero; make A's gradient non-zero
    return model


@pytest.mark.parametrize("seq", [None, 4], ids=["2d", "3d"])
@pytest.mark.parametrize("wrapper", ["wrap_model", "opacus"])
def test_peft_lora_per_sample_grads_match_loop(seq, wrapper):
    torch.manual_seed(2)
    x = torch.randn(5, 6) if seq is None else torch.randn(5, seq, 6)
    y = torch.randint(0, 3, (5,))
    ids = torch.zeros(5, dtype=torch.long)
    expected = per_example_grads(peft_model(), x, y, "none", ids, None)

    model = peft_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)  # only the adapters train
    gsm = wrap_model(model) if wrapper == "wrap_model" else GradSampleModule(model)
    nn.functional.cross_entropy(gsm(x), y).backward()
    got = [p.grad_sample for p in model.parameters() if p.requires_grad]
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max().item() <= TOL
    gsm.to_standard_module()
