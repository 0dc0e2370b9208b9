"""One experiment runner: any rules on any setting, paired seeds, the regime as options.

    python benchmarks/experiment.py run --setting digits --rules fedit,exact,ffa --seeds 0-9 \\
        --lr 1e-2 --local-epochs 5 --init pissa --out results/experiments/digits-lr1e-2-E5-pissa.json
    python benchmarks/experiment.py summary results/experiments/*.json --reference exact --markdown out.md

Every federated run is ``strategy.start`` on an :class:`~fedlowrank.strategies.testing.InProcessGrid`
(the strategies and ``build_client_app`` client code that ``flwr run`` runs, without a SuperLink
per run). Paired seeds: for one seed every rule sees the same sites, split, batch order, base,
adapter initialisation and client sampling. Per seed the runner also measures the headroom:
the frozen base (round 0) and central fine-tuning of the same adapters on the pooled site
data (same lr, ``rounds x local_epochs`` epochs, capped at 30).

Per round it records the central test metrics (accuracy; AUC, per-group AUC, worst-group AUC
and ES-AUC for binary tasks), the largest adapter product norm ``||U diag(S[g]) V^T||`` over
layers and groups (plus what fedex/flora folded into the base), the bytes the clients sent (the arrays of the real reply messages) and the
rule's aggregation error against the exact weighted sum. Runs are spread over worker processes
(one torch thread each).

Rules: any registered aggregation rule (``exact``, ``fedit``, ``ffa``, ``flora``,
``flexlora-dense``, ``zero-pad``), ``fedex`` (``exact`` with the residual folded into the
base, FedEx-LoRA), ``fairlora-exact`` and ``fairlora-paper`` (G = 2; per-group settings);
strategy options after a slash, e.g. ``exact/gauge=lora`` or ``exact/align=false``;
``fedavg-full``: full-model FedAvg (every weight trains, Flower's ``FedAvg`` averages them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import Strategy


from experiment_settings import SETTINGS, Regime, Setting, start_factors  # noqa: E402



def parse_seeds(text: str) -> list[int]:
    """``"0-9"`` or ``"0,3,5"`` -> seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds


# --------------------------------------------------------------------------- one run


def adapted(setting: Setting, regime: Regime, groups: int, rank: int | None = None):
    import copy

    from fedlowrank.adapters import inject_adapters

    model = copy.deepcopy(setting.base)
    inject_adapters(model, setting.targets, rank=rank or regime.rank, groups=groups, trainable=setting.trainable)
    start_factors(model, setting)
    return model


def evaluate(model, setting: Setting, start=None) -> dict:
    """Central test metrics of an adapted model (and its largest adapter product norm).

    A model without adapters (the full-model baseline) reports instead the largest
    ``||W - W_start||`` over the adapter targets, ``start`` being the model it started from.
    """
    import torch

    from fedlowrank.adapters import adapter_layers
    from fedlowrank.clients import predict
    from fedlowrank.fairness import group_fairness_report

    pred = predict(model, setting.test, torch.device("cpu"))
    if setting.binary:
        report = group_fairness_report(pred.labels, pred.scores, pred.groups, num_groups=max(2, setting.groups))
        out = {k: float(report[k]) for k in ("auc", "acc", "es_auc", "auc_g0", "auc_g1")}
        out["worst_group_auc"] = min(out["auc_g0"], out["auc_g1"])
    else:
        out = {"acc": float(np.mean(pred.scores.argmax(1) == pred.labels))}
    layers = adapter_layers(model)
    if not layers:  # the full-model baseline: how far the adapted layers moved from the base
        with torch.no_grad():
            out["product_norm_max"] = max(
                # Frobenius over all entries: a conv kernel as its (out, in x k x k) matrix.
                float(torch.linalg.vector_norm(module.weight.double() - start.get_submodule(name).weight.double()))
                for name, module in model.named_modules() if re.fullmatch(setting.targets, name))
        return out
    norms = []
    with torch.no_grad():
        for layer in layers.values():
            for row in layer.lora_S:
                # ||scale U diag(s) V^T + fold_U fold_V^T||_F from the small QR cores (never
                # d_out x d_in); the fold is what fedex and flora moved into the base.
                left = torch.cat([layer.scale * layer.lora_U.double() * row.double(), layer.fold_U.double()], 1)
                right = torch.cat([layer.lora_V.double(), layer.fold_V.double()], 1)
                _, ru = torch.linalg.qr(left)
                _, rv = torch.linalg.qr(right)
                norms.append(float(torch.linalg.matrix_norm(ru @ rv.T)))
    out["product_norm_max"] = max(norms)
    return out


def central(setting: Setting, regime: Regime, seed: int) -> dict:
    """Central fine-tuning of the same adapters on the pooled site data: the headroom's top."""
    import torch

    from fedlowrank.clients import train_local

    groups = setting.groups if setting.groups > 1 else 1
    best = {}
    for g in sorted({1, groups}):
        torch.manual_seed(seed)  # the federated runs' adapter start, whatever ran before in this process
        model = adapted(setting, regime, g)
        pooled = [b for site in setting.site_train for b in site]
        optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=regime.lr)
        rng = random.Random(0)
        for _ in range(min(30, regime.rounds * regime.local_epochs)):
            rng.shuffle(pooled)
            train_local(model, pooled, epochs=1, lr=regime.lr, device=torch.device("cpu"), optimizer=optimiser)
        best[f"G{g}"] = evaluate(model, setting)
    return best


def split_rules(text: str) -> list[str]:
    """``"fedit,exact/momentum=0.9,server_learning_rate=0.3"`` -> ``["fedit", "exact/momentum=0.9,server_learning_rate=0.3"]``:
    a comma-separated token with ``=`` and no ``/`` continues the previous rule's options."""
    rules: list[str] = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        if "=" in token and "/" not in token and rules:
            rules[-1] += "," + token
        else:
            rules.append(token)
    return rules


def parse_rule(rule: str) -> tuple[str, dict]:
    """``"exact/gauge=lora,align=false"`` -> ``("exact", {"gauge": "lora", "align": False})``."""
    name, _, options = rule.partition("/")
    parsed: dict = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        parsed[key] = _option_value(value)
    return name, parsed


def _option_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def make_strategy(rule: str, regime: Regime):
    """The library's strategy for ``rule`` (:func:`fedlowrank.strategies.make_strategy`) with this regime's sampling."""
    from fedlowrank.strategies import make_strategy as library_strategy

    name, options = parse_rule(rule)
    secure = bool(options.pop("secure", False))
    if secure:  # secure aggregation: no single reply to cap (SecureLowRank bounds weights on the clients)
        options.setdefault("share_cap", None)
    strategy = library_strategy(name, regime.rank, fraction_evaluate=0.0, fraction_train=regime.fraction, min_train_nodes=2,
                                min_available_nodes=2, **options)
    if secure:
        from fedlowrank.strategies.secure import SecureLowRank

        strategy = SecureLowRank(strategy)
    return strategy


def federated(setting: Setting, regime: Regime, rule: str, seed: int) -> list[dict]:
    """One federated run: per-round central metrics, bytes sent and aggregation error."""
    import torch
    from flwr.app import ConfigRecord

    from fedlowrank.strategies.testing import InProcessGrid

    run_config = {"seed": seed}
    if regime.client_ranks:
        run_config["client-ranks"] = ",".join(map(str, regime.client_ranks))
    nodes = [{"partition-id": i, "num-partitions": regime.sites} for i in range(regime.sites)]
    # Seeded before the model exists: every rule of a seed starts from the same V (and head).
    random.seed(seed)  # Flower samples clients with the random module: same draws for every rule
    torch.manual_seed(seed)
    name, options = parse_rule(rule)
    if name == FULL_MODEL_RULE:
        if options:
            raise ValueError(f"{FULL_MODEL_RULE} takes no options, got {options}")
        run = full_model_run(setting, regime)
    else:
        run = adapter_run(setting, regime, rule)
    grid = InProcessGrid(run.app, nodes, run_config)
    curve: list[dict] = []
    sent: dict[int, int] = {}
    errors: dict[int, float] = {}
    refused: dict[int, int] = {}
    recording = SecureRecordingStrategy if hasattr(run.strategy, "train_round") else RecordingStrategy
    strategy = recording(run.strategy, sent, refused, errors)

    def evaluate_fn(server_round, arrays):
        run.load(arrays)
        point = evaluate(run.model, setting, run.start)
        point.update(round=server_round, bytes=sent.get(server_round, 0), agg_error=errors.get(server_round),
                     client_errors=refused.get(server_round, 0))
        curve.append(point)
        return None

    train_config = ConfigRecord({"lr": regime.lr, "local-epochs": regime.local_epochs})
    if hasattr(strategy, "train_round"):  # several exchanges a round: fedlowrank's run loop drives them
        from fedlowrank.strategies.checkpoint import run as run_rounds

        run_rounds(strategy, grid, run.initial, num_rounds=regime.rounds, train_config=train_config, evaluate_fn=evaluate_fn)
    else:
        strategy.start(grid=grid, initial_arrays=run.initial, num_rounds=regime.rounds, train_config=train_config,
                       evaluate_fn=evaluate_fn)
    return curve


class RecordingStrategy(Strategy):
    """Wraps a strategy (as Flower's DP wrappers do) and records, per round, the reply bytes,
    the replies that came back as errors and the largest aggregation error."""

    def __init__(self, strategy: Strategy, sent: dict, refused: dict, errors: dict) -> None:
        super().__init__()
        self.strategy, self.sent, self.refused, self.errors = strategy, sent, refused, errors

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.sent[server_round] = sum(len(a.data) for m in replies if not m.has_error() for a in m.content["arrays"].values())
        # A client refuses a global out of range (an entry above 1e6) with an error reply.
        self.refused[server_round] = sum(m.has_error() for m in replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if metrics is not None:
            rel = [float(v) for k, v in metrics.items() if k.startswith("agg-error-rel")]
            self.errors[server_round] = max(rel) if rel else float("nan")
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)


class SecureRecordingStrategy(RecordingStrategy):
    """:class:`RecordingStrategy` for a secure round: bytes are every stage's, per client, from the round's metrics."""

    def train_round(self, server_round, arrays, config, grid, timeout):
        outcome = self.strategy.train_round(server_round, arrays, config, grid, timeout)
        metrics = outcome.metrics or {}
        self.sent[server_round] = int(metrics.get("secure-bytes-per-client", 0) * metrics.get("agg-clients-kept", 0))
        self.refused[server_round] = sum(m.has_error() for m in outcome.replies)
        rel = [float(v) for k, v in metrics.items() if k.startswith("agg-error-rel")]
        self.errors[server_round] = max(rel) if rel else float("nan")
        return outcome

    def state_dict(self):
        return self.strategy.state_dict()


@dataclass
class Run:
    """What one rule needs for a federated run: client code, strategy, the server's model."""

    app: object  # flwr ClientApp
    strategy: object  # flwr Strategy
    model: object  # the server-side model the global arrays load into for evaluation
    initial: object  # ArrayRecord
    load: Callable  # ArrayRecord -> None (into model)
    start: object = None  # the full-model baseline's starting model (its norms are distances to it)


def adapter_run(setting: Setting, regime: Regime, rule: str) -> Run:
    """Adapters exchanged with fedlowrank's client app and a fedlowrank strategy."""
    import copy

    from fedlowrank.adapters import exchange_state, load_exchange_state
    from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, from_record, to_record

    from fedlowrank.strategies.catalog import is_grouped

    groups = setting.groups if is_grouped(parse_rule(rule)[0]) else 1

    def data_fn(context):
        site = int(context.node_config["partition-id"])
        return ClientData(setting.site_train[site], setting.site_test[site], max(groups, 2) if setting.binary else 1)

    adapter = AdapterConfig(setting.targets, rank=regime.rank, groups=groups, trainable=setting.trainable)
    app = build_client_app(lambda _context: copy.deepcopy(setting.base), data_fn, adapter, lr=regime.lr,
                           local_epochs=regime.local_epochs)
    model = adapted(setting, regime, groups)
    return Run(app, make_strategy(rule, regime), model, to_record(exchange_state(model)),
               lambda arrays: load_exchange_state(model, from_record(arrays)))


# --------------------------------------------------------------------------- full-model FedAvg


FULL_MODEL_RULE = "fedavg-full"


def full_model_run(setting: Setting, regime: Regime) -> Run:
    """The full-model baseline: every weight trains locally, Flower's own ``FedAvg`` averages.

    Same data, batches, optimiser (Adam), learning rate, epochs and client sampling as the
    adapter rules; what differs is what trains and what is sent (the whole model). Under a
    PiSSA start it starts from the pretrained weights (the residual plus the adapter part).
    """
    import copy

    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg

    from fedlowrank.clients import train_local

    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        model = copy.deepcopy(start)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        config = msg.content["config"]
        site = int(context.node_config["partition-id"])
        result = train_local(model, setting.site_train[site], int(config["local-epochs"]), float(config["lr"]),
                             torch.device("cpu"))
        metrics = MetricRecord({"train-loss": result.loss, "num-examples": result.num_examples})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    start = pretrained(setting)
    model = copy.deepcopy(start)
    strategy = FedAvg(fraction_train=regime.fraction, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    initial = ArrayRecord(model.state_dict())  # ArrayRecord copies the tensors
    return Run(app, strategy, model, initial, lambda arrays: model.load_state_dict(arrays.to_torch_state_dict()), start)


def pretrained(setting: Setting):
    """The base with every weight trainable and any PiSSA part added back: ``W = W_res + U V^T``."""
    import copy

    import torch

    model = copy.deepcopy(setting.base)
    with torch.no_grad():
        for name, (u, v) in setting.init_factors.items():
            model.get_submodule(name).weight.add_(u @ v.T)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def quiet() -> None:
    import logging

    import torch

    from flwr.common.logger import FLOWER_LOGGER

    torch.set_num_threads(1)
    # The strategy's per-round INFO lines, times rules x seeds, would bury the progress lines.
    FLOWER_LOGGER.setLevel(logging.WARNING)


def run_seed(setting_name: str, regime: Regime, rules: list[str], seed: int) -> dict:
    """Everything for one seed: headroom and one curve per rule (runs in a worker)."""
    quiet()
    started = time.time()
    setting = SETTINGS[setting_name](seed, regime)
    out = {"seed": seed, "central": central(setting, regime, seed), "runs": {}}
    for rule in rules:
        out["runs"][rule] = federated(setting, regime, rule, seed)
    out["seconds"] = time.time() - started
    return out


# --------------------------------------------------------------------------- CLI


def run(args) -> None:
    regime = Regime(lr=args.lr, local_epochs=args.local_epochs, rounds=args.rounds, sites=args.sites,
                    fraction=args.fraction, alpha=args.alpha, rank=args.rank,
                    client_ranks=tuple(int(r) for r in args.client_ranks.split(",") if r.strip()),
                    init=args.init, batch_size=args.batch_size)
    rules = split_rules(args.rules)
    seeds = parse_seeds(args.seeds)
    if args.setting not in SETTINGS:
        raise SystemExit(f"unknown setting {args.setting!r}; choose one of {sorted(SETTINGS)}")
    out_path = Path(args.out)
    if out_path.exists() and not args.force:
        raise SystemExit(f"{out_path} exists; pass --force to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = {"setting": args.setting, "regime": asdict(regime), "rules": rules, "seeds": {},
               "command": "python benchmarks/experiment.py " + " ".join(sys.argv[1:])}
    started = time.time()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_seed, args.setting, regime, rules, seed): seed for seed in seeds}
        for done, future in enumerate(futures, start=1):
            seed = futures[future]
            results["seeds"][str(seed)] = future.result()
            last = {r: c[-1].get("auc", c[-1]["acc"]) for r, c in results["seeds"][str(seed)]["runs"].items()}
            print(f"[{done}/{len(seeds)}] seed {seed} ({results['seeds'][str(seed)]['seconds']:.0f} s): "
                  + ", ".join(f"{r} {v:.4f}" for r, v in last.items()), flush=True)
            tmp = out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results))
            tmp.replace(out_path)
    print(f"wrote {out_path} in {time.time() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run rules on a setting for paired seeds")
    r.add_argument("--setting", required=True, help=f"one of {sorted(SETTINGS)}")
    r.add_argument("--rules", required=True, help="comma-separated rules")
    r.add_argument("--seeds", default="0-9")
    r.add_argument("--lr", type=float, default=1e-2)
    r.add_argument("--local-epochs", type=int, default=1)
    r.add_argument("--rounds", type=int, default=15)
    r.add_argument("--sites", type=int, default=5)
    r.add_argument("--fraction", type=float, default=1.0, help="share of sites sampled to train each round")
    r.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew across sites")
    r.add_argument("--rank", type=int, default=8, help="global adapter rank")
    r.add_argument("--client-ranks", default="", help="e.g. 2,4,8,16 (cycled over sites)")
    r.add_argument("--init", default="lora", choices=("lora", "pissa"))
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    r.add_argument("--out", required=True)
    r.add_argument("--force", action="store_true")
    s = sub.add_parser("summary", help="paired differences, intervals, headroom; Markdown and plots")
    s.add_argument("--rules", default="", help="only these rules (comma-separated, as for run): seeds pool where these all ran")
    s.add_argument("results", nargs="+")
    s.add_argument("--reference", default=None, help="rule the others are paired against")
    s.add_argument("--markdown", default=None)
    s.add_argument("--plots", default=None, help="folder for curve plots")
    o = sub.add_parser("loso", help="choose a default leaving each setting out, judge it there")
    o.add_argument("results", nargs="+", help="results files; files of one setting are paired by seed")
    o.add_argument("--candidates", required=True, help="comma-separated rules the default is chosen from")
    o.add_argument("--baselines", required=True, help="comma-separated adapter baselines (the best per setting counts)")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
    elif args.command == "loso":
        from experiment_summary import loso_main

        loso_main(args.results, split_rules(args.candidates), split_rules(args.baselines))
    else:
        from experiment_summary import summary_main

        summary_main(args)


if __name__ == "__main__":
    main()
