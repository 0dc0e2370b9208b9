"""Adapter-only DP-SGD for one client round, with the accountant kept in ``Context.state``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING

import torch
from flwr.app import ConfigRecord, Context
from flwr.common import log
from torch import nn

from fedlowrank.training import TrainResult, train_local

ACCOUNTANT_KEY = "dp-accountant"


@dataclass
class DPConfig:
    """DP-SGD settings for every round of a client.

    Parameters
    ----------
    noise_multiplier : float
        Noise std over ``max_grad_norm``.
    max_grad_norm : float
        Per-sample clipping bound over all trainable parameters (adapters and head).
    delta : float
        Target delta; keep it below 1 / (local examples).
    target_epsilon : float
        Total budget over all rounds. A client whose next round would pass it does not
        train and says so in its metrics (``dp_stopped = 1``).
    mechanism : {"rdp", "prv"}
        Opacus accountant.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float = 8.0
    mechanism: str = "rdp"


def train_private(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    lr: float,
    device: torch.device,
    dp: DPConfig,
    context: Context,
) -> tuple[TrainResult | None, dict[str, float]]:
    """One round of DP-SGD on the trainable parameters, or None if the budget is spent.

    Returns the training result (None when the client stopped) and the round's privacy
    metrics: epsilon spent so far, epsilon had it trained, the target, and whether it
    stopped. The accountant's history is read from and written back to
    ``context.state[ACCOUNTANT_KEY]``.
    """
    # Imported here so that clients without DP do not need Opacus installed.
    from fedlowrank.privacy import check_budget, make_private, round_plan

    history = dict(context.state[ACCOUNTANT_KEY]) if ACCOUNTANT_KEY in context.state else None
    sample_rate, steps = round_plan(loader, epochs)
    check = check_budget(
        history,
        target_epsilon=dp.target_epsilon,
        delta=dp.delta,
        noise_multiplier=dp.noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        mechanism=dp.mechanism,
    )
    if check.stop:
        log(
            WARNING,
            "DP budget: epsilon %.3f spent, this round would reach %.3f > %.3f; not training",
            check.epsilon_spent, check.epsilon_after, dp.target_epsilon,
        )
        return None, check.metrics()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    private = make_private(
        model,
        optimizer,
        loader,
        max_grad_norm=dp.max_grad_norm,
        delta=dp.delta,
        noise_multiplier=dp.noise_multiplier,
        accountant_state=history,
        mechanism=dp.mechanism,
    )
    result = train_local(
        private.model, private.data_loader, epochs, lr, device,
        optimizer=private.optimizer, on_empty_batch=private.empty_batch_step,
    )
    context.state[ACCOUNTANT_KEY] = ConfigRecord(private.export_state())
    metrics = {**check.metrics(), "dp_epsilon": private.epsilon()}
    private.close()
    return result, metrics
