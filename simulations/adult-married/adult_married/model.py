"""The frozen base: a small MLP pretrained on a different Adult population (prepare.py)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).parent / "assets"
ADAPTER_TARGETS = r"net\.(fc1|fc2)"
TRAINABLE = r"net\.head\..*"


class IncomeMLP(nn.Module):
    """Two hidden layers of 64 units and one logit."""

    def __init__(self, num_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(num_features, hidden),
                act1=nn.ReLU(),
                fc2=nn.Linear(hidden, hidden),
                act2=nn.ReLU(),
                head=nn.Linear(hidden, 1),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_base_model() -> IncomeMLP:
    """The pretrained base with its weights from ``assets/base_model.json``."""
    stored = json.loads((ASSETS / "base_model.json").read_text())
    model = IncomeMLP(stored["num_features"], stored["hidden"])
    model.load_state_dict({k: torch.tensor(v) for k, v in stored["state_dict"].items()})
    return model
