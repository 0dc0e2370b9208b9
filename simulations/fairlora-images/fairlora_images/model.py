"""The frozen base: a small MONAI DenseNet pretrained on 10-class Fashion-MNIST (prepare.py).

The sites' task is binary, so a new one-logit head reads the base's ten class logits and
trains in full. Adapters go on the convolutions of the last dense block and on the
pretrained classifier (``class_layers.out``): with one row of singular values per
group (FairLoRA) they can move the class logits differently for each group, which is
what the per-group labelling rule needs (data.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).parent / "assets"
# A safetensors file wrapped in JSON: a Flower app bundle (FAB) carries only .py, .toml,
# .md, .yaml, .json and .jsonl files and LICENSE (flwr's built-in rule, which
# fab-include cannot widen), so a bare .safetensors asset would be missing wherever the
# app runs from its bundle, `flwr run` included.
BASE_WEIGHTS = ASSETS / "base_densenet.json"
WEIGHTS_FORMAT = "safetensors+base64"
NUM_CLASSES = 10
# 28x28 images padded to 32x32 (data.py): the DenseNet halves the size four times before
# its last block (stem conv, stem pool, two transitions), so the last block sees 2x2 maps
# instead of 1x1 ones at 28x28.
IMAGE_SIZE = 32
DENSENET = {
    "spatial_dims": 2, "in_channels": 1, "out_channels": NUM_CLASSES,
    "init_features": 16, "growth_rate": 12, "block_config": (2, 2, 2), "bn_size": 4,
}
ADAPTER_TARGETS = [r"base\.features\.denseblock3\.denselayer\d+\.layers\.conv[12]", r"base\.class_layers\.out"]
TRAINABLE = r"head\..*"


def densenet() -> nn.Module:
    """The 10-class MONAI DenseNet of :data:`DENSENET`, random weights (42,594 parameters)."""
    from monai.networks.nets import DenseNet

    return DenseNet(**DENSENET)


class GroupTaskNet(nn.Module):
    """The pretrained 10-class DenseNet (``base``) and a new binary ``head`` on its logits."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.head = nn.Linear(NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


def write_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Store a state dict as safetensors bytes inside JSON (:data:`WEIGHTS_FORMAT`); its size in bytes."""
    from safetensors.torch import save

    raw = save({k: v.detach().contiguous() for k, v in state.items()}, metadata=metadata)
    document = {"format": WEIGHTS_FORMAT, "sha256": hashlib.sha256(raw).hexdigest(), "metadata": metadata,
                "safetensors": base64.b64encode(raw).decode("ascii")}
    text = json.dumps(document, indent=1)
    Path(path).write_text(text)
    return len(text)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a :func:`write_weights` file, checked against its checksum.

    Raises
    ------
    FileNotFoundError
        If the file is missing (rebuild it with ``python -m fairlora_images.prepare``).
    ValueError
        If it is not in :data:`WEIGHTS_FORMAT` or its bytes do not match the checksum.
    """
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"base weights {path} not found: rebuild them with `python -m fairlora_images.prepare` "
            "from simulations/fairlora-images (needs Fashion-MNIST)"
        )
    document = json.loads(path.read_text())
    if document.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: format {document.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
    raw = base64.b64decode(document["safetensors"])
    if hashlib.sha256(raw).hexdigest() != document.get("sha256"):
        raise ValueError(f"{path}: the weights do not match their sha256 (truncated or edited file)")
    return load(raw)  # safetensors: tensors only, no pickled code


def load_base_model(weights: str | Path = BASE_WEIGHTS) -> GroupTaskNet:
    """The pretrained DenseNet from ``assets/base_densenet.json`` with a fresh head.

    The head's initial values come from torch's global RNG: the server seeds it and sends
    the head with the first global model, so every site starts from the same one.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_weights`; ValueError also if the weights do not fit the network.
    """
    from fedlowrank.imaging import load_weights

    base = densenet()
    load_weights(base, read_weights(weights), strict=True)
    return GroupTaskNet(base)
