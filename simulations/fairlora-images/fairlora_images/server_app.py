"""ServerApp: the shared fedlowrank server (:mod:`fedlowrank.strategies.serverapp`) on the DenseNet.

Strategy, sampling, compression, results file and final adapter come from the run config
(``pyproject.toml``), the same keys and results format as every fedlowrank app; this file
says what is the app's own: its model, its group names and, in simulation, the pooled
test images the server evaluates on.
"""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlowrank.adapters import inject_adapters
from fedlowrank.datasets.fashion_mnist import DEFAULT_ROOT
from fedlowrank.strategies.serverapp import AppSpec, serve

from .client_app import DEFAULT_SITE_IMAGES
from .data import GROUP_NAMES, check_dataset, loader, pooled
from .model import ADAPTER_TARGETS, TRAINABLE, load_base_model


def global_model(rank: int, groups: int) -> torch.nn.Module:
    """The frozen base with adapters at the global rank, as the clients build it."""
    model = load_base_model()
    inject_adapters(model, ADAPTER_TARGETS, rank=rank, groups=groups, trainable=TRAINABLE)
    return model


def central_test_images(cfg, num_partitions: int):
    """Every simulated site's test images, pooled; refused where the sites hold their own files."""
    dataset = check_dataset(str(cfg.get("dataset", "fashion-mnist")))
    if dataset == "medmnist":
        raise ValueError(
            "dataset = 'medmnist': the sites' images are in their own files, which the server cannot read; "
            "set central-evaluation = false (the federated figures the sites send remain)"
        )
    per_site = int(cfg.get("site-images", DEFAULT_SITE_IMAGES))
    root = str(cfg.get("data-root", "")).strip() or DEFAULT_ROOT
    return loader(pooled(dataset, num_partitions, per_site, int(cfg["seed"]), "test", root), 1024, shuffle=False)


SPEC = AppSpec(name="fairlora-images", global_model=global_model, group_names=GROUP_NAMES,
               central_test=central_test_images, default_groups=2)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context, SPEC)
