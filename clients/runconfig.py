"""A ClientApp configured by the run config: adapter group count and DP-SGD, as the apps use them.

The apps' ServerApp (:mod:`fedlowrank.strategies.serverapp`) reads ``groups`` and
``dp-*`` from the run config; this is the client half of the same contract, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from fedlowrank.runconfig import RunSettings

from .app import AdapterConfig, ClientData, build_client_app
from .private import DPConfig


def dp_from_run_config(context: Context) -> DPConfig | None:
    """Adapter-only DP-SGD when the run config sets ``dp-noise-multiplier`` > 0, with its
    ``dp-max-grad-norm``, ``dp-delta`` and ``dp-target-epsilon`` (:class:`RunSettings`)."""
    settings = RunSettings.from_config(context.run_config)
    if settings.dp_noise_multiplier <= 0:
        return None
    return DPConfig(
        noise_multiplier=settings.dp_noise_multiplier,
        max_grad_norm=settings.dp_max_grad_norm,
        delta=settings.dp_delta,
        target_epsilon=settings.dp_target_epsilon,
    )


def build_run_config_client_app(
    model_fn: Callable[[Context], nn.Module],
    data_fn: Callable[[Context], ClientData],
    target_modules: str | list[str],
    trainable: str | list[str],
    rank: int = 4,
    default_groups: int = 1,
    group_counts: Iterable[int] = (1, 2),
) -> ClientApp:
    """A ClientApp that trains adapters with the run config's ``groups`` rows of ``S``.

    One :func:`build_client_app` per supported group count, DP-SGD from
    :func:`dp_from_run_config`; each message goes to the one for the run's ``groups``
    (``default_groups`` when unset), and an unsupported count is an error naming the choices.
    """
    apps = {
        groups: build_client_app(
            model_fn=model_fn,
            data_fn=data_fn,
            adapter=AdapterConfig(target_modules=target_modules, rank=rank, groups=groups, trainable=trainable),
            dp=dp_from_run_config,
        )
        for groups in group_counts
    }
    app = ClientApp()

    def dispatch(msg: Message, context: Context) -> Message:
        groups = RunSettings.from_config(context.run_config, groups=default_groups).groups
        if groups not in apps:
            raise ValueError(f"groups = {groups}; this app supports {sorted(apps)}")
        return apps[groups](msg, context)

    app.train()(dispatch)
    app.evaluate()(dispatch)
    return app
