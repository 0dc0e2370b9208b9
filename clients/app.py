"""Build a Flower ``ClientApp`` that fine-tunes SVD-factored adapters on local data."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import DEBUG

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from torch import nn

from fedlowrank.adapters import FACTOR_SUFFIXES, adapter_layers, exchange_state, inject_adapters, load_exchange_state
from fedlowrank.adapters.peft import freeze_factor, is_peft_model, lora_layers
from fedlowrank.fairness import group_fairness_report, local_statistics
from fedlowrank.aggregation.validate import MAX_ABS_VALUE
from fedlowrank.wire import FAIRNESS_STATS_KEY, FROZEN_KEY, GROUP_COUNT_PREFIX, GROUP_SHARE_KEY, TRUNCATION_KEY

from .compression import compress_reply
from .persist import persist_state, restore_state
from .private import DPConfig, train_private
from .secure import make_secure_mod
from fedlowrank.runconfig import RunSettings, parse_ranks  # noqa: F401  (parse_ranks re-exported)
from fedlowrank.training import TrainResult, describe_compute, pick_device, predict, train_local


@dataclass
class AdapterConfig:
    """Where adapters go and how big they are.

    ``rank`` is the default; a node overrides it with ``rank`` in its node config
    (deployment), the run config key ``client-ranks`` (a comma-separated rank per
    partition, simulation) or the run config key ``rank``, so clients may differ in rank.
    """

    target_modules: str | list[str]
    rank: int = 8
    groups: int = 1
    alpha: float | None = None
    trainable: str | list[str] = field(default_factory=list)


@dataclass
class ClientData:
    """One client's data: iterables of ``(x, y, group_ids)`` batches."""

    train: Iterable
    test: Iterable
    num_groups: int = 1


def client_rank(context: Context, default: int) -> int:
    """This node's adapter rank: node config ``rank``, then the run config's
    ``client-ranks`` (by partition), then its ``rank``, then ``default``."""
    if "rank" in context.node_config:
        return int(context.node_config["rank"])
    settings = RunSettings.from_config(context.run_config)
    if settings.ranks and "partition-id" in context.node_config:
        return settings.ranks[int(context.node_config["partition-id"]) % len(settings.ranks)]
    return settings.rank if "rank" in context.run_config else default


def build_model(model_fn: Callable[[Context], nn.Module], adapter: AdapterConfig, context: Context) -> nn.Module:
    """The frozen base from ``model_fn`` with adapters injected at this node's rank.

    A PEFT LoRA model from ``model_fn`` is used as it is (its LoRA layers are the
    adapters, read and written exactly by :mod:`fedlowrank.adapters.peft`); a node rank
    or a group count it cannot honour is an error, not ignored.
    """
    model = model_fn(context)
    if is_peft_model(model):
        if adapter.groups != 1:
            raise ValueError(f"a PEFT LoRA model holds one group; AdapterConfig(groups={adapter.groups}) needs fedlowrank adapters")
        ranks = {layer.r[next(iter(layer.r))] for layer in lora_layers(model).values()}
        wanted = client_rank(context, adapter.rank)
        if "rank" in context.node_config and ranks != {wanted}:
            raise ValueError(f"node config rank = {wanted}, but the PEFT model's LoRA ranks are {sorted(ranks)}: set r in its LoraConfig")
        return model
    inject_adapters(
        model,
        adapter.target_modules,
        rank=client_rank(context, adapter.rank),
        groups=adapter.groups,
        alpha=adapter.alpha,
        trainable=adapter.trainable,
    )
    return model


def to_record(state: dict) -> ArrayRecord:
    """Tensors to an ArrayRecord of float32 numpy arrays, keeping key order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().float().numpy())) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict:
    """ArrayRecord to a dict of tensors."""
    return record.to_torch_state_dict()


def set_group_share(model: nn.Module, config) -> None:
    """Load the server's group shares (config ``group-share``) into every grouped layer.

    They weight the rows of ``S`` for samples of unknown group; a list of another length
    than the layer's group count is an error rather than a silent mismatch.
    """
    if GROUP_SHARE_KEY not in config:
        return
    shares = [float(x) for x in config[GROUP_SHARE_KEY]]
    for name, layer in adapter_layers(model).items():
        if len(shares) != layer.groups:
            raise ValueError(f"{name}: got {len(shares)} group shares for {layer.groups} groups")
        layer.group_share.copy_(torch.tensor(shares, dtype=layer.group_share.dtype))


def check_global(record: ArrayRecord, max_abs: float) -> None:
    """Refuse a global model with non-finite or absurdly large entries, naming the tensor."""
    for key, array in record.items():
        values = array.numpy()
        if values.dtype.kind != "f":
            continue
        if not np.all(np.isfinite(values)):
            raise ValueError(f"global tensor '{key}' from the server contains NaN or Inf; not training on it")
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > max_abs:
            raise ValueError(f"global tensor '{key}' from the server has an entry of {peak:.3g} (limit {max_abs:g}); not training on it")


def freeze_factors(model: nn.Module, names) -> None:
    """Stop training the factors the server's rule keeps fixed (FFA-LoRA: ``lora_V``)."""
    for name in names:
        if name not in FACTOR_SUFFIXES:
            raise ValueError(f"server asked to freeze {name!r}; factors are {FACTOR_SUFFIXES}")
        if is_peft_model(model):
            freeze_factor(model, name)
        for layer in adapter_layers(model).values():
            getattr(layer, name).requires_grad_(False)


def group_count_metrics(counts: dict[int, int], groups: int) -> dict[str, int]:
    """``group-count-g{g}`` for every group of a grouped adapter (0 for groups not seen)."""
    return {f"{GROUP_COUNT_PREFIX}{g}": int(counts.get(g, 0)) for g in range(groups)} if groups > 1 else {}


def fairness_statistics(pred, num_groups: int) -> ArrayRecord | None:
    """Mergeable fairness statistics of a binary task for the server (no predictions leave)."""
    if np.ndim(pred.scores) != 1:
        return None
    stats = local_statistics(pred.labels, pred.scores, pred.groups, num_groups)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.items()})


def build_client_app(
    model_fn: Callable[[Context], nn.Module],
    data_fn: Callable[[Context], ClientData],
    adapter: AdapterConfig,
    local_epochs: int = 1,
    lr: float = 1e-3,
    dp: DPConfig | Callable[[Context], DPConfig | None] | None = None,
    max_abs_global: float = MAX_ABS_VALUE,
) -> ClientApp:
    """A ``ClientApp`` that loads the global adapter, trains locally, evaluates and replies.

    Parameters
    ----------
    model_fn : callable
        ``context -> nn.Module``: the frozen base model (pretrained weights loaded),
        built the same way on every node and on the server.
    data_fn : callable
        ``context -> ClientData`` for this node (use ``context.node_config``'s
        ``partition-id`` in simulation, local files in deployment).
    adapter : AdapterConfig
        Where adapters go and their rank.
    local_epochs, lr : int, float
        Defaults; the round's config keys ``local-epochs`` and ``lr`` override them.
    dp : DPConfig or callable, optional
        Train with adapter-only DP-SGD (Opacus; needs ``fedlowrank[dp]``); a callable
        ``context -> DPConfig | None`` decides per node and run (run config). The
        accountant lives in ``Context.state``; train replies add ``dp_epsilon`` (spent
        so far), ``dp_epsilon_if_trained``, ``dp_target_epsilon`` and ``dp_stopped``. A
        client whose next round would exceed the budget does not train: it returns the
        global arrays with ``num-examples = 0`` and ``dp_stopped = 1``.
    max_abs_global : float (default: 1e6)
        The received global model is refused (a clear error, nothing trained) if any
        entry is NaN, Inf or larger than this: a server that sends 1e30 is broken.

    Notes
    -----
    Train replies carry the adapter factors and other trainable tensors (the wire
    convention of :mod:`fedlowrank.adapters.state`) and a MetricRecord with
    ``train-loss`` and ``num-examples``. Evaluate replies carry ``eval-loss``,
    ``num-examples`` and the group-fairness metrics of
    :func:`fedlowrank.fairness.group_fairness_report` on the local test data.
    With grouped adapters (``adapter.groups > 1``) train replies also carry
    ``group-count-g{g}``, the samples of each group in one epoch (FairLoRA's weights).
    ``Context.state`` is saved after each round where the node config's ``state-dir`` or
    the run config's ``checkpoint-dir`` says, and a resumed run starts from it
    (:mod:`fedlowrank.clients.persist`).
    Evaluate replies of a binary task carry the ArrayRecord ``fairness-stats``
    (:func:`fedlowrank.fairness.local_statistics`), which the server merges into
    federation-wide metrics (:class:`fedlowrank.strategies.FederatedFairnessMetrics`).
    A ``group-share`` list in the round's config sets the layers' shares for unknown
    groups.
    """
    # Train messages of a secure round go through the secure-aggregation stages first (clients/secure.py).
    app = ClientApp(mods=[make_secure_mod(lambda context: client_rank(context, adapter.rank))])
    device = pick_device()

    def prepare(msg: Message, context: Context) -> tuple[nn.Module, ClientData]:
        model = build_model(model_fn, adapter, context).to(device)
        config = msg.content["config"] if "config" in msg.content else {}
        check_global(msg.content["arrays"], max_abs_global)
        # Shares first: a grouped adapter of lower rank keeps its columns in their order.
        set_group_share(model, config)
        truncation = str(config.get(TRUNCATION_KEY, "svd"))
        load_exchange_state(model, {k: v.to(device) for k, v in from_record(msg.content["arrays"]).items()}, truncation)
        freeze_factors(model, config.get(FROZEN_KEY, []))
        return model, data_fn(context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        server_round = int(config.get("server-round", 0))
        restore_state(context, server_round)  # a resumed run: what this node saved before
        model, data = prepare(msg, context)
        epochs = int(config.get("local-epochs", local_epochs))
        round_lr = float(config.get("lr", lr))
        privacy: dict[str, float] = {}
        dp_config = dp(context) if callable(dp) else dp
        if dp_config is None:
            result = train_local(model, data.train, epochs, round_lr, device)
        else:
            result, privacy = train_private(model, data.train, epochs, round_lr, device, dp_config, context)
        if result is None:  # privacy budget spent: nothing trained, nothing to weigh
            result = TrainResult(loss=0.0, num_examples=0, steps=0)
        log(DEBUG, "client trained %d steps (%s), loss %.4f", result.steps, describe_compute(device), result.loss)
        # Under L-GreCo the reply carries the compressed update instead (clients/compression.py).
        arrays, extra = compress_reply(config, msg.content["arrays"], to_record(exchange_state(model)), context)
        metrics = MetricRecord({"train-loss": result.loss, "num-examples": result.num_examples, **extra, **privacy})
        metrics.update(group_count_metrics(result.group_counts, adapter.groups))
        content = RecordDict({"arrays": arrays, "metrics": metrics})
        persist_state(context, server_round)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model, data = prepare(msg, context)
        pred = predict(model, data.test, device)
        report = group_fairness_report(pred.labels, pred.scores, pred.groups, num_groups=data.num_groups)
        metrics = {f"eval-{k}": float(v) for k, v in report.items() if k != "n"}
        metrics.update({"eval-loss": pred.loss, "num-examples": len(pred.labels)})
        content = RecordDict({"metrics": MetricRecord(metrics)})
        stats = fairness_statistics(pred, data.num_groups)
        if stats is not None:
            content[FAIRNESS_STATS_KEY] = stats
        return Message(content=content, reply_to=msg)

    return app
