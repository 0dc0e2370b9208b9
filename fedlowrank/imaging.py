"""The imaging networks hospitals already use, built without downloading anything.

torchvision's ResNet-18 and ViT-B/16, MONAI's DenseNet121 and ViT, each with the module
patterns where adapters go by default (the convolutions of the residual / dense blocks,
the attention and MLP linears of the transformers) and the head that trains in full.
Pretrained weights are the user's: a local file (``.safetensors``, or a PyTorch state
dict read with ``weights_only=True``) or a state dict passed in; never a download.
Needs the ``[imaging]`` extra (torchvision, MONAI).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ImagingModel:
    """How to build one network and where its adapters and trainable head go."""

    build: Callable[[int, int, int], nn.Module]
    """``(num_classes, in_channels, image_size) -> nn.Module`` with random weights."""
    targets: str
    """Regular expression of the module names that take adapters."""
    head: str
    """Regular expression of the parameter names that train in full (the new head)."""


def _resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _vit_b_16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from torchvision.models import vit_b_16

    if in_channels != 3:
        raise ValueError(f"torchvision's vit_b_16 takes 3 input channels, got {in_channels}: repeat grey images to RGB")
    return vit_b_16(weights=None, num_classes=num_classes, image_size=image_size)


def _monai_densenet121(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)


def _monai_vit(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from monai.networks.nets import ViT

    return ViT(in_channels=in_channels, img_size=(image_size, image_size), patch_size=(16, 16), spatial_dims=2,
               classification=True, num_classes=num_classes, post_activation=None)


MODELS: dict[str, ImagingModel] = {
    # torchvision's MultiheadAttention reads out_proj's weight without calling it, so the
    # ViT's adapters go on its MLP linears (mlp.0, mlp.3); MONAI's attention calls its linears.
    "resnet18": ImagingModel(_resnet18, r"layer\d\.\d\.conv[12]", r"fc\..*"),
    "vit_b_16": ImagingModel(_vit_b_16, r"encoder\.layers\.encoder_layer_\d+\.mlp\.[03]", r"heads\..*"),
    "monai_densenet121": ImagingModel(
        _monai_densenet121, r"features\.denseblock\d\.denselayer\d+\.layers\.conv[12]", r"class_layers\.out\..*"
    ),
    "monai_vit": ImagingModel(_monai_vit, r"blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.linear[12])", r"classification_head\..*"),
}


def load_weights(model: nn.Module, weights: str | Path | dict, strict: bool = True) -> None:
    """Load the user's pretrained weights: a local file or a state dict, never a download.

    ``.safetensors`` files load with safetensors; other files with
    ``torch.load(weights_only=True)`` (no pickled code runs). With ``strict=False`` a
    head of another size is left as built (fine-tuning to a new task) and everything
    else must match.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If keys or shapes do not match the model (the error names them).
    """
    if not isinstance(weights, dict):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights {path} not found (fedlowrank never downloads weights)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    mismatched = [k for k, v in weights.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if strict:
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or unexpected or mismatched:
            raise ValueError(
                f"pretrained weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"shape mismatch {mismatched[:5]}"
            )
    else:
        weights = {k: v for k, v in weights.items() if k not in mismatched}
    model.load_state_dict(weights, strict=strict)


def build_imaging_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    weights: str | Path | dict | None = None,
) -> tuple[nn.Module, ImagingModel]:
    """A network from :data:`MODELS`, with the user's pretrained weights when given.

    Returns the model (no adapters yet: pass ``spec.targets`` and ``spec.head`` to
    :func:`fedlowrank.adapters.inject_adapters`) and its :class:`ImagingModel` spec.
    Weights load non-strictly on the head only: a checkpoint trained for another
    number of classes keeps everything but the head.
    """
    if name not in MODELS:
        raise ValueError(f"unknown imaging model {name!r}; choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    model = spec.build(num_classes, in_channels, image_size)
    if weights is not None:
        load_weights(model, weights, strict=False)
    return model, spec
