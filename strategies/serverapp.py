"""The ServerApp body fedlowrank's apps share: strategy from the run config, results, adapter.

An app describes itself with an :class:`AppSpec` (its name, how to build the global model,
its group names, and, in simulation, its pooled test batches) and calls
:func:`serve`. Everything else is the same for every app, so it lives here once: the
strategy chosen by run config (``strategy``, ``rule``, ``residual``, ``rank``,
``client-ranks``, sampling, ``robust``), the compression wrapper (``compression*``), the
site count check (``num-sites``), the checkpointed round loop (``checkpoint-dir``,
``resume-from``), one line per round for the operator, the results file (one per run,
rewritten every round) and the final adapter (safetensors).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlowrank.adapters import adapter_layers, load_exchange_state, save_adapter
from fedlowrank.results import RoundRecord, RunFailed, RunResults
from fedlowrank.runconfig import RunSettings
from fedlowrank.wire import EVALUATE_METRICS
from fedlowrank.training import pick_device, predict
from fedlowrank.fairness import group_fairness_report

from .checkpoint import run
from .catalog import make_strategy, rule_of, strategy_names
from .federated_fairness import FederatedFairnessMetrics
from .privacy_figures import PrivacyFigures
from .fedlowrank import FedLowRank
from .initial import initial_arrays
from .lgreco import LGreCo
from .secure import SecureLowRank


@dataclass(frozen=True)
class AppSpec:
    """What differs between apps; :func:`serve` does the rest."""

    name: str
    """The app's folder name (``adult-married``), for messages and results file names."""
    global_model: Callable[[int, int], torch.nn.Module]
    """``(rank, groups) -> model``: the frozen base with adapters, as the clients build it."""
    group_names: Sequence[str]
    """Names of groups 0 and 1 (the metrics' ``_g0``/``_g1``), in the round line and results."""
    central_test: Callable[[object, int], Iterable] | None = None
    """``(run_config, num_sites) -> test batches`` for the server's evaluation (simulation only)."""
    default_groups: int = 1


def sampling(settings: RunSettings) -> dict:
    """Flower's client sampling and the update bound from the run settings."""
    return {
        "fraction_train": settings.fraction_train,
        "min_train_nodes": settings.min_train_nodes,
        "min_available_nodes": settings.min_train_nodes,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_evaluate_nodes": settings.min_train_nodes,
        # Every strategy merges the sites' fairness statistics into federation-wide metrics,
        # and keeps only the privacy figures an honest site could report in this run.
        "evaluate_metrics_aggr_fn": FederatedFairnessMetrics(num_groups=2),
        "train_metrics_aggr_fn": PrivacyFigures(settings.dp_target_epsilon if settings.dp_noise_multiplier > 0 else None),
        # The apps' clients send the wire contract's evaluate metrics: an invented key is left out, named.
        "evaluate_metric_keys": EVALUATE_METRICS,
        # None, "clip" or "reject": bound each update's norm by robust-factor x the round's median.
        "robust": settings.robust_mode,
        "robust_factor": settings.robust_factor,
        # Where a deployment knows its sites: each node's largest weight (node-max-weights).
        "node_max_weights": settings.declared_weights,
        # A secure sum has no single weight to cap: each site bounds its own (secure-weight-bound).
        **({"share_cap": None} if settings.secure else {}),
    }


def build_strategy(name: str, rank: int, settings: RunSettings) -> FedLowRank:
    """The run config's strategy (:func:`fedlowrank.strategies.make_strategy`); ``fedlowrank``
    takes its rule and residual mode from the run config (``rule``, default 'exact'; ``residual``
    'drop', 'carry' or 'fold', empty for the rule's default)."""
    options = sampling(settings)
    if name == "fedlowrank":
        name = settings.rule
        options["residual"] = settings.residual.strip() or None
    return make_strategy(name, rank, **options)


def check_strategy(settings: RunSettings) -> tuple[str, int, int]:
    """``(strategy, rank, groups)`` from the run config, refused before any client trains
    where the strategy cannot take them (unknown name, ranks above the global one, mixed
    ranks for a factor-averaging strategy, FairLoRA without groups)."""
    name, rank, ranks = settings.strategy, settings.rank, settings.ranks
    if name not in strategy_names():
        raise ValueError(f"unknown strategy {name!r}; choose one of {strategy_names()}")
    above = sorted({r for r in ranks if r > rank})
    if above:
        raise ValueError(f"client-ranks {settings.client_ranks!r}: ranks {above} are above the global rank {rank}")
    # What the strategy can take is what its rule declares ('fedlowrank' runs the run config's rule).
    rule = rule_of(settings.rule if name == "fedlowrank" else name)
    if len(set(ranks) | {rank}) > 1 and not rule.mixed_ranks:
        raise ValueError(
            f"strategy {name!r} averages factors entry by entry and cannot mix client ranks "
            f"(client-ranks {settings.client_ranks!r}, rank {rank}); use 'fedlowrank' or 'fairlora-exact'"
        )
    groups = settings.groups
    if rule.grouped != (groups > 1):
        raise ValueError(f"strategy {name!r} with groups = {groups}: FairLoRA needs groups = 2, the others groups = 1")
    if settings.secure and not rule.sums_products:
        raise ValueError(f"strategy {name!r} averages factors, which a secure sum of products cannot give: with "
                         "secure = true use 'fedlowrank' (rule exact, flexlora-dense or flora) or 'fairlora-exact'")
    return name, rank, groups


def with_secure_aggregation(strategy: Strategy, settings: RunSettings) -> Strategy:
    """Wrap ``strategy`` in :class:`SecureLowRank` when the run config says ``secure = true``."""
    if not settings.secure:
        return strategy
    return SecureLowRank(
        strategy,
        share_fraction=settings.secure_share_fraction,
        threshold_fraction=settings.secure_threshold,
        weight_bound=settings.secure_weight_bound,
        value_bound=settings.secure_value_bound,
        sketch_width=settings.secure_sketch_width or None,
    )


def with_compression(strategy: Strategy, settings: RunSettings) -> Strategy:
    """Wrap ``strategy`` in :class:`LGreCo` as the run config's ``compression`` asks.

    ``"none"``: unchanged. ``"lgreco"``: adaptive per-tensor settings, uniform
    ``compression-default`` during warm-up, re-allocated every
    ``compression-reallocate-every`` rounds within ``compression-alpha`` times its
    error. ``"uniform:<codec>:<setting>"`` (e.g. ``"uniform:powersgd:4"``): that
    setting for every tensor, no tables asked for.
    """
    mode = settings.compression.strip()
    if mode == "none":
        return strategy
    if mode == "lgreco":
        return LGreCo(
            strategy,
            default=settings.compression_default,
            alpha=settings.compression_alpha,
            warmup_rounds=settings.compression_warmup,
            reallocate_every=settings.compression_reallocate_every,
        )
    if mode.startswith("uniform:"):
        setting = mode[len("uniform:") :]
        return LGreCo(strategy, default=setting, allocate=False)
    raise ValueError(f"unknown compression {mode!r}; use 'none', 'lgreco' or 'uniform:<codec>:<setting>'")


@torch.no_grad()
def adapter_norms(model: torch.nn.Module) -> dict[str, float]:
    """Largest factor norm ``||U||`` and largest product norm ``||scale U diag(S[g]) V^T||`` over layers.

    The product norm is what the adapter does to the model; the factor norm alone can stay
    put while the product grows (or the other way round).
    """
    layers = adapter_layers(model).values()
    products = [
        float(torch.linalg.matrix_norm(layer.scale * (layer.lora_U * row) @ layer.lora_V.T))
        for layer in layers
        for row in layer.lora_S
    ]
    return {
        "adapter-norm-max": max(float(layer.lora_U.norm()) for layer in layers),
        "adapter-product-norm-max": max(products),
    }


def wait_for_sites(grid: Grid, expected: int, app_name: str, timeout: float = 120.0) -> int:
    """The number of connected SuperNodes, once it is ``expected`` (0: whatever is there).

    The sites are the data split: a federation of another size would silently be another
    experiment (plain ``flwr run`` simulates 2 SuperNodes by default), so it is an error.
    """
    if type(grid).__name__ == "InMemoryGrid":  # a simulation: its SuperNodes exist from the start
        timeout = min(timeout, 5.0)
    deadline = time.monotonic() + timeout
    while True:
        found = len(list(grid.get_node_ids()))
        if not expected or found == expected:
            return found
        if found > expected or time.monotonic() > deadline:
            raise ValueError(
                f"the federation has {found} SuperNodes but the run config says num-sites = {expected}: "
                f"run `fedlowrank run {app_name} --supernodes {expected}`, or `flwr run ... --federation-config "
                f"\"num-supernodes={expected}\"`, or set num-sites = {found}"
            )
        time.sleep(1.0)


def results_path(settings: RunSettings, strategy: str, app_name: str) -> Path:
    """Where this run's results go: ``results-file``, or a name of its own per run.

    An explicit file that exists is overwritten only when the run resumes (``resume-from``);
    otherwise the run refuses to start rather than lose earlier results.
    """
    given = settings.results_file.strip()
    if not given:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        rule = settings.rule if strategy == "fedlowrank" else ""
        ranks = settings.client_ranks.replace(",", "-").replace(" ", "")
        parts = [app_name.replace("-", "_"), strategy, rule, f"r{settings.rank}", f"ranks{ranks}" if ranks else "",
                 settings.compression.replace(":", "-"), f"dp{settings.dp_noise_multiplier:g}" if settings.dp_noise_multiplier else "",
                 settings.robust_mode or "", "secure" if settings.secure else "", "resumed" if settings.resume_from.strip() else "",
                 f"seed{settings.seed}", stamp]
        return (Path("results") / ("-".join(p for p in parts if p and p != "none") + ".json")).resolve()
    path = Path(given).expanduser().resolve()
    if path.exists() and not settings.resume_from.strip():
        raise ValueError(f"results-file {path} exists: pick another name (or leave results-file empty for one per run)")
    return path


def round_line(server_round: int, num_rounds: int, result, group_names: Sequence[str]) -> str:
    """The one line per round an operator reads; the rest is in the results file."""
    central = result.evaluate_metrics_serverapp.get(server_round, {})
    federated = {k[len("fed-"):]: v for k, v in result.evaluate_metrics_clientapp.get(server_round, {}).items() if k.startswith("fed-")}
    train = result.train_metrics_clientapp.get(server_round, {})
    parts = [f"round {server_round}/{num_rounds}:"]
    for label, figures in (("central", central), ("federated", {} if central else federated)):
        if "auc" in figures:
            groups = ", ".join(f"{name} {figures[f'auc_g{g}']:.4f}" for g, name in enumerate(group_names) if f"auc_g{g}" in figures)
            parts.append(f"{label} AUC {figures['auc']:.4f} ({groups}) ES-AUC {figures['es_auc']:.4f}")
    if server_round:
        silent = int(train.get("agg-clients-silent", 0))
        late = f", {silent} silent past round-timeout" if silent else ""
        if "agg-clients-kept" in train:
            parts.append(f"| sites {int(train['agg-clients-kept'])} kept, {int(train['agg-clients-dropped'])} dropped{late}")
        else:
            parts.append(f"| no valid reply: global kept{late}")
        if "lgreco-bytes" in train:
            parts.append(f"| {int(train['lgreco-bytes']):,} B sent")
        if "dp_epsilon" in train:
            parts.append(f"| epsilon {train['dp_epsilon']:.2f} (worst site)")
    return " ".join(parts)


def central_evaluation(model: torch.nn.Module, batches: Iterable, device: torch.device):
    """Server-side evaluation of the global arrays on pooled test batches (simulation only)."""
    model = model.to(device)
    batches = list(batches) if not hasattr(batches, "__len__") else batches

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_exchange_state(model, arrays.to_torch_state_dict())
        pred = predict(model, batches, device)
        report = group_fairness_report(pred.labels, pred.scores, pred.groups, num_groups=2)
        metrics = {k: float(v) for k, v in report.items() if k != "n"}
        metrics.update({"loss": pred.loss, **adapter_norms(model)})
        return MetricRecord(metrics)

    return evaluate


def serve(grid: Grid, context: Context, spec: AppSpec) -> None:
    """Run the federation the run config describes; results and final adapter to disk."""
    cfg = context.run_config
    settings = RunSettings.from_config(cfg, groups=spec.default_groups)
    name, rank, groups = check_strategy(settings)
    torch.manual_seed(settings.seed)  # the initial head and adapters, sent to every site
    initial = initial_arrays(spec.global_model(rank, groups))
    num_sites = wait_for_sites(grid, settings.num_sites, spec.name)
    # The server's view of every site's test data exists only in simulation; a deployment
    # sets central-evaluation = false and reads the federated figures the sites send.
    evaluate_fn = None
    if settings.central_evaluation:
        if spec.central_test is None:
            raise ValueError(f"{spec.name} has no central test data: set central-evaluation = false")
        evaluate_fn = central_evaluation(spec.global_model(rank, groups), spec.central_test(cfg, num_sites), pick_device())
    strategy = with_compression(with_secure_aggregation(build_strategy(name, rank, settings), settings), settings)
    data = f", dataset {cfg['dataset']}" if str(cfg.get("dataset", "")).strip() else ""
    rule = f" (rule {settings.rule})" if name == "fedlowrank" else ""
    rounds = settings.num_server_rounds
    log(INFO, "%s: %d sites, %d round%s, strategy %s%s, rank %d%s", spec.name, num_sites, rounds, "s" * (rounds != 1),
        name, rule, rank, data)
    started = time.time()
    path = results_path(settings, name, spec.name)
    stop_after = settings.stop_after_round

    written: dict[str, RunResults] = {}  # the last results written, to mark a failed run in them

    def write_results(server_round: int, result) -> None:
        """Results so far, every round: a run that stops loses nothing already measured."""
        results = RunResults(
            strategy=name,
            app=spec.name,
            run_config=dict(cfg.items()),
            num_sites=num_sites,
            group_names=list(spec.group_names),
            compression_allocations={str(r): a for r, a in getattr(strategy, "allocation_history", {}).items()},
            seconds=time.time() - started,
            rounds=[
                RoundRecord(
                    rnd,
                    dict(result.evaluate_metrics_serverapp.get(rnd, {})),
                    dict(result.evaluate_metrics_clientapp.get(rnd, {})),
                    dict(result.train_metrics_clientapp.get(rnd, {})),
                )
                for rnd in range(server_round + 1)
            ],
        )
        line = round_line(server_round, settings.num_server_rounds, result, spec.group_names)
        if line.partition(":")[2].strip():  # round 0 without central evaluation has nothing to say
            log(INFO, "%s", line)
        results.write(path)
        written["results"] = results
        if server_round and server_round == stop_after:
            # A drill: stop as a crash would, after the round's checkpoint is on disk.
            checkpoint = settings.checkpoint_dir.strip()
            how = (f"resume with --run-config \"checkpoint-dir='{checkpoint}' resume-from='{checkpoint}'\" and the same settings"
                   if checkpoint else "no checkpoint-dir was set, so this run cannot be resumed")
            raise RuntimeError(f"stop-after-round = {stop_after}: stopping the ServerApp as a crash would; {how}")

    try:
        result = run(
            strategy,
            grid,
            initial,
            num_rounds=settings.num_server_rounds,
            timeout=settings.round_timeout,
            train_config=ConfigRecord({"lr": settings.lr, "local-epochs": settings.local_epochs}),
            evaluate_fn=evaluate_fn,
            checkpoint_dir=settings.checkpoint_dir.strip() or None,
            resume_from=settings.resume_from.strip() or None,
            on_round=write_results,
            app=spec.name,
            force_resume=settings.resume_force,
        )
    except RunFailed as err:  # the file says so: a report must not show the untouched base as a result
        if "results" in written:
            written["results"].failure = str(err)
            written["results"].write(path)
        raise
    adapter_path = Path(settings.save_adapter.strip() or path.with_suffix(".adapter.safetensors"))
    save_adapter(adapter_path, {k: a.numpy() for k, a in result.arrays.items()},
                 {"rank": rank, "groups": groups, "run_config": {k: v for k, v in cfg.items()}})
    log(INFO, "results written to %s, final adapter to %s", path, adapter_path)
