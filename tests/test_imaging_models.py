"""torchvision and MONAI networks take adapters by pattern and train on CPU, base untouched.

Nothing downloads: every network is built with random weights, and "pretrained" weights
come from a local file written here.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
pytest.importorskip("monai")

from fedlowrank.adapters import SVDConv, SVDLinear, adapter_layers, inject_adapters  # noqa: E402
from fedlowrank.imaging import MODELS, build_imaging_model, load_weights  # noqa: E402

# name -> (in_channels, image size, adapter type expected on the targets)
CASES = {
    "resnet18": (3, 32, SVDConv),
    "vit_b_16": (3, 32, SVDLinear),
    "monai_densenet121": (1, 32, SVDConv),
    "monai_vit": (1, 32, SVDLinear),
}


def norms_frozen_in_eval(model: nn.Module) -> None:
    # The frozen base's BatchNorm statistics are part of the base: they must not drift.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapters_train_and_the_base_stays_bit_identical(name):
    in_channels, size, adapter_type = CASES[name]
    torch.manual_seed(0)
    model, spec = build_imaging_model(name, num_classes=3, in_channels=in_channels, image_size=size)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    names = inject_adapters(model, spec.targets, rank=2, trainable=spec.head)
    assert names and all(isinstance(layer, adapter_type) for layer in adapter_layers(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or re.fullmatch(spec.head, n) for n in trainable)

    x, y = torch.randn(4, in_channels, size, size), torch.tensor([0, 1, 2, 1])
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    norms_frozen_in_eval(model)
    for _ in range(2):
        logits = model(x)
        logits = logits[0] if isinstance(logits, tuple) else logits  # MONAI's ViT adds hidden states
        loss = nn.functional.cross_entropy(logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    after = model.state_dict()
    for key, value in base_before.items():
        if re.fullmatch(spec.head, key):
            continue
        # An adapted layer's base moved under ".base."; everything else kept its name.
        moved = key.rsplit(".", 1)
        new_key = f"{moved[0]}.base.{moved[1]}" if moved[0] in names else key
        assert torch.equal(after[new_key], value), f"{name}: base tensor {key} changed"
    changed_u = [n for n, layer in adapter_layers(model).items() if layer.lora_U.abs().sum() > 0]
    assert changed_u, f"{name}: no adapter moved"
    head = [k for k in base_before if re.fullmatch(spec.head, k)]
    assert head and any(not torch.equal(after[k], base_before[k]) for k in head)


def test_pretrained_weights_load_from_a_local_file_and_a_new_head_is_kept(tmp_path):
    from safetensors.torch import save_file

    source, _ = build_imaging_model("resnet18", num_classes=10, in_channels=1)
    path = tmp_path / "resnet18-pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model, _ = build_imaging_model("resnet18", num_classes=2, in_channels=1, weights=path)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (2, 512)  # the 10-class head is not forced onto 2 classes
    torch.save(source.state_dict(), tmp_path / "resnet18.pt")
    strict_target, _ = build_imaging_model("resnet18", num_classes=10, in_channels=1)
    load_weights(strict_target, tmp_path / "resnet18.pt")
    assert torch.equal(strict_target.fc.weight, source.fc.weight)


def test_bad_model_names_and_missing_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown imaging model 'resnet50'"):
        build_imaging_model("resnet50", num_classes=2)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_imaging_model("resnet18", num_classes=2, weights=tmp_path / "absent.pt")
    model, _ = build_imaging_model("resnet18", num_classes=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_weights(model, {k: torch.zeros(1) for k in model.state_dict()})
    assert set(MODELS) == set(CASES)
