"""ServerApp: the shared fedlowrank server (:mod:`fedlowrank.strategies.serverapp`) on this app's model.

Strategy, sampling, compression, results file and final adapter come from the run config
(``pyproject.toml``); this file says what is the app's own: its model, its group names and,
in simulation, the pooled test rows the server evaluates on.
"""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlowrank.adapters import inject_adapters
from fedlowrank.strategies.serverapp import AppSpec, serve

from .data import group_names, loader, pooled_test_rows
from .model import ADAPTER_TARGETS, TRAINABLE, load_base_model

# The server's central evaluation groups the pooled test rows by sex; a site's own choice
# (node config group-attribute) is not visible to the server.
GROUP_ATTRIBUTE = "sex"


def global_model(rank: int, groups: int = 1) -> torch.nn.Module:
    """The frozen base with adapters at the global rank, as the clients build it."""
    model = load_base_model()
    inject_adapters(model, ADAPTER_TARGETS, rank=rank, groups=groups, trainable=TRAINABLE)
    return model


def central_test(cfg, num_sites: int):
    """Every simulated site's test rows, pooled (a simulation-only view)."""
    return loader(pooled_test_rows(num_sites, int(cfg["seed"])), 2048, shuffle=False, group_attribute=GROUP_ATTRIBUTE)


SPEC = AppSpec(name="adult-married", global_model=global_model, group_names=group_names(GROUP_ATTRIBUTE),
               central_test=central_test)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context, SPEC)
