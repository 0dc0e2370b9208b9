"""FedIT vs FedLowRank vs FairLoRA (paper, exact) vs central fine-tuning, 5 paired seeds.

Run from the repository root::

    python benchmarks/fairness_experiment.py --seeds 5 --out results/fairness_experiment.json

Every federated run is ``strategy.start`` on an :class:`~fedlowrank.strategies.inprocess.InProcessGrid`:
the same strategy methods and the same ``build_client_app`` client code as ``flwr run``,
without launching a SuperLink per run. Paired seeds: for one seed every rule sees the same
sites, splits, batch order and adapter initialisation.

Settings (docs/design.md, "Experiments that can tell methods apart"):

``adult``
    UCI Adult married population, 5 sites, base pretrained on a disjoint population,
    group = sex (``simulations/adult-married``). Real group, clear headroom, but
    per-group models do not beat one pooled model there (checked and reported).
``scanners``
    A documented stand-in on real images: sklearn's bundled 8x8 digits (UCI optical
    digits), task "digit >= 5". Half of the fine-tuning images pass through a second
    "scanner" with an inverted gamma contrast curve ``x -> 1 - x**0.5``; the scanner id
    is the group and is NOT a model input (adapters route on it). The base is
    pretrained on scanner-A images of a disjoint set of digits, so fine-tuning has
    headroom, and per-group models beat a pooled one (checked and reported). Sites
    differ in scanner mix (10% .. 90% scanner B).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlowrank.adapters import exchange_state, inject_adapters, load_exchange_state
from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, from_record, predict, to_record, train_local
from fedlowrank.fairness import group_fairness_report
from fedlowrank.strategies import FairLoRA, FedLowRank
from fedlowrank.strategies.fairlora import grouped_residual_norms
from fedlowrank.strategies.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations" / "adult-married"))
from adult_married import data as adult  # noqa: E402
from adult_married.model import ADAPTER_TARGETS, TRAINABLE, load_base_model  # noqa: E402

RULES = ("fedit", "fedlowrank", "fairlora-paper", "fairlora-exact")
METRICS = ("auc", "auc_g0", "auc_g1", "es_auc", "worst_group_auc", "xauc_g0_g1", "xauc_g1_g0", "dpd", "eod")


# --------------------------------------------------------------------------- settings


@dataclass
class Setting:
    """A federated fine-tuning problem: frozen base, adapter targets, sites."""

    name: str
    base: Callable[[], nn.Module]
    targets: str
    trainable: str
    sites: int
    rounds: int
    lr: float
    batch_size: int
    site_rows: Callable[[int, int], tuple[np.ndarray, np.ndarray]]  # (site, seed) -> train, test rows
    arrays: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]  # x, y, group of all rows
    rank: int = 4

    def loader(self, rows, shuffle, seed=0, batch_size=None):
        x, y, g = self.arrays()
        ds = TensorDataset(torch.from_numpy(x[rows]), torch.from_numpy(y[rows]), torch.from_numpy(g[rows]))
        return DataLoader(ds, batch_size or self.batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))

    def pooled(self, seed, part):
        return np.concatenate([self.site_rows(s, seed)[part] for s in range(self.sites)])


def adult_setting(rounds: int) -> Setting:
    def arrays():
        x, y, g, _ = adult.load_population()
        return x, y, g

    return Setting("adult", load_base_model, ADAPTER_TARGETS, TRAINABLE, 5, rounds, 3e-3, 128,
                   lambda site, seed: adult.site_rows(site, 5, seed), arrays)


class DigitMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 32),
                                             act2=nn.ReLU(), head=nn.Linear(32, 1)))

    def forward(self, x):
        return self.net(x)


@lru_cache(maxsize=1)
def scanner_population():
    """Digits as [0, 1] pixels; the first 40% (scanner A only) pretrain the base."""
    digits = load_digits()
    rng = np.random.default_rng(2024)  # fixed: the population does not change with the seed
    order = rng.permutation(len(digits.target))
    x = (digits.data[order] / 16.0).astype(np.float32)
    y = (digits.target[order] >= 5).astype(np.float32)
    cut = int(0.4 * len(y))
    fine = np.arange(cut, len(y))
    sites = np.array_split(rng.permutation(fine), 5)
    groups = np.zeros(len(y), dtype=np.int64)
    for site, rows in enumerate(sites):
        share_b = 0.1 + 0.2 * site  # sites differ in scanner mix
        groups[rows[: int(round(share_b * len(rows)))]] = 1
    x[groups == 1] = 1.0 - np.sqrt(x[groups == 1])  # scanner B: inverted gamma contrast curve
    return x, y, groups, np.arange(cut), sites


@lru_cache(maxsize=1)
def scanner_base_state():
    x, y, _, pre, _ = scanner_population()
    torch.manual_seed(0)
    model = DigitMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[pre]), torch.from_numpy(y[pre])
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            loss = nn.functional.binary_cross_entropy_with_logits(model(xt[idx]).squeeze(1), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def scanner_base():
    model = DigitMLP()
    model.load_state_dict(scanner_base_state())
    return model


def scanner_setting(rounds: int) -> Setting:
    def site_rows(site, seed):
        rows = np.random.default_rng(seed * 100 + site).permutation(scanner_population()[4][site])
        cut = int(round(0.3 * len(rows)))
        return np.sort(rows[cut:]), np.sort(rows[:cut])

    return Setting("scanners", scanner_base, r"net\.(fc1|fc2)", r"net\.head\..*", 5, rounds, 3e-3, 32,
                   site_rows, lambda: scanner_population()[:3])


# --------------------------------------------------------------------------- checks


def per_group_check(setting: Setting, seed: int) -> dict:
    """Pooled logistic regression vs one per group, AUC on each group's test rows."""
    x, y, g = setting.arrays()
    train, test = setting.pooled(seed, 0), setting.pooled(seed, 1)
    pooled = LogisticRegression(max_iter=2000).fit(x[train], y[train])
    out = {}
    for grp in (0, 1):
        tr, te = train[g[train] == grp], test[g[test] == grp]
        own = LogisticRegression(max_iter=2000).fit(x[tr], y[tr])
        out[f"pooled_auc_g{grp}"] = roc_auc_score(y[te], pooled.predict_proba(x[te])[:, 1])
        out[f"per_group_auc_g{grp}"] = roc_auc_score(y[te], own.predict_proba(x[te])[:, 1])
    return out


# --------------------------------------------------------------------------- runs


def evaluate(model, setting: Setting, rows) -> dict:
    pred = predict(model, setting.loader(rows, False, batch_size=2048), torch.device("cpu"))
    return group_fairness_report(pred.labels, pred.scores, pred.groups, num_groups=2)


def adapted(setting: Setting, groups: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # same adapter init for every rule of a seed
    model = setting.base()
    inject_adapters(model, setting.targets, rank=setting.rank, groups=groups, trainable=setting.trainable)
    return model


def central(setting: Setting, seed: int, groups: int) -> dict:
    """Upper bound: the same adapters trained on all sites' rows pooled, one epoch per round."""
    model = adapted(setting, groups, seed)
    train = setting.loader(setting.pooled(seed, 0), True, seed)
    for _ in range(setting.rounds):
        train_local(model, train, 1, setting.lr, torch.device("cpu"))
    return evaluate(model, setting, setting.pooled(seed, 1))


def _factors(record, module):
    return [torch.from_numpy(record[f"{module}.{leaf}"].numpy()).double() for leaf in ("lora_U", "lora_S", "lora_V")]


def aggregation_errors(sent, contents, aggregated, grouped: bool) -> tuple[float, float]:
    """Mean over layers and groups of ``||M_g - A_g|| / ||M_g||`` and ``/ ||M_g - W_g||``.

    ``M_g`` is the rule's own target (per-group count weights for grouped rules, sample
    shares otherwise), ``A_g`` what the rule hands back, ``W_g`` the global adapter sent
    this round: the second figure is the share of the round's update the rule lost.
    """
    if grouped:
        counts = np.array([[c["metrics"][f"group-count-g{g}"] for g in range(2)] for c in contents], dtype=np.float64)
        w = torch.from_numpy(counts / counts.sum(axis=0))
    else:
        n = np.array([c["metrics"]["num-examples"] for c in contents], dtype=np.float64)
        w = torch.from_numpy(n / n.sum())[:, None]
    full, update = [], []
    for key in aggregated.keys():
        if not key.endswith(".lora_U"):
            continue
        module = key[: -len(".lora_U")]
        clients = [_factors(c["arrays"], module) for c in contents]
        us, ss, vs = ([f[i] for f in clients] for i in range(3))
        residual, target = grouped_residual_norms(us, ss, vs, w, *_factors(aggregated, module))
        moved, _ = grouped_residual_norms(us, ss, vs, w, *_factors(sent, module))
        full += (residual / target).tolist()
        update += (residual / moved).tolist()
    return float(np.mean(full)), float(np.mean(update))


def measured(cls):
    """``cls`` whose train metrics gain the aggregation errors, measured the same way for every rule."""

    class Measured(cls):
        def configure_train(self, server_round, arrays, config, grid):
            self._sent = arrays
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            contents = [m.content for m in replies if not m.has_error()]
            grouped = self._sent[next(k for k in self._sent.keys() if k.endswith("lora_S"))].shape[0] > 1
            full, update = aggregation_errors(self._sent, contents, arrays, grouped)
            metrics["exp-error-rel"], metrics["exp-error-update-rel"] = full, update
            return arrays, metrics

    return Measured


def make_strategy(rule: str, rank: int):
    common = {"fraction_evaluate": 0.0}  # central evaluation only, to keep the CPU budget
    if rule == "fedit":
        return measured(FedAvg)(**common)
    if rule == "fedlowrank":
        return measured(FedLowRank)(rank=rank, **common)
    return measured(FairLoRA)(mode=rule.split("-")[1], rank=rank, **common)


def federated(setting: Setting, rule: str, seed: int) -> dict:
    """One federated run; per-round central metrics, adapter norms and aggregation error."""
    groups = 2 if rule.startswith("fairlora") else 1
    test_rows = setting.pooled(seed, 1)

    def data_fn(context):
        site = int(context.node_config["partition-id"])
        train, test = setting.site_rows(site, seed)
        return ClientData(setting.loader(train, True, seed * 10 + site), setting.loader(test, False), 2)

    adapter = AdapterConfig(setting.targets, rank=setting.rank, groups=groups, trainable=setting.trainable)
    app = build_client_app(lambda ctx: setting.base(), data_fn, adapter, lr=setting.lr)
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": setting.sites} for i in range(setting.sites)], {})
    model = adapted(setting, groups, seed)
    curve = []

    def evaluate_fn(server_round, arrays):
        load_exchange_state(model, from_record(arrays))
        report = evaluate(model, setting, test_rows)
        norm = max(float(p.detach().norm()) for n, p in model.named_parameters() if "lora_" in n)
        curve.append({**{k: report[k] for k in METRICS}, "factor_norm_max": norm})
        return None

    strategy = make_strategy(rule, setting.rank)
    result = strategy.start(grid=grid, initial_arrays=to_record(exchange_state(model)), num_rounds=setting.rounds,
                            train_config=ConfigRecord({"lr": setting.lr, "local-epochs": 1}), evaluate_fn=evaluate_fn)
    train = [result.train_metrics_clientapp[r] for r in sorted(result.train_metrics_clientapp)]
    return {"curve": curve, "agg_error": [float(m["exp-error-rel"]) for m in train],
            "agg_error_update": [float(m["exp-error-update-rel"]) for m in train]}


# --------------------------------------------------------------------------- summary


def rounds_to(curve, target) -> int | None:
    for rnd, point in enumerate(curve):
        if point["auc"] >= target:
            return rnd
    return None


def summarise(runs: dict, setting_rounds: int) -> dict:
    """Final-round mean/std per rule, rounds to 90% headroom, paired differences."""
    seeds = sorted(runs["central"])
    table, finals = {}, {}
    for rule in ("central", "central-grouped", *RULES):
        vals = {k: np.array([runs[rule][s]["final"][k] for s in seeds]) for k in METRICS}
        finals[rule] = vals
        row = {k: [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0] for k, v in vals.items()}
        if rule in RULES:
            r90 = [runs[rule][s]["rounds_to_90"] for s in seeds]
            reached = [r for r in r90 if r is not None]
            row["rounds_to_90"] = [float(np.mean(reached)) if reached else None, len(reached)]
            for name in ("agg_error", "agg_error_update"):
                err = np.array([np.mean(runs[rule][s][name]) for s in seeds])
                row[name] = [float(err.mean()), float(err.std(ddof=1)) if len(err) > 1 else 0.0]
            first = np.array([runs[rule][s]["agg_error_update"][0] for s in seeds])
            row["agg_error_update_round1"] = [float(first.mean()), float(first.std(ddof=1)) if len(first) > 1 else 0.0]
        table[rule] = row
    pairs = {}
    for a, b in (("fedlowrank", "fedit"), ("fairlora-paper", "fedit"), ("fairlora-exact", "fedit"),
                 ("fairlora-exact", "fedlowrank"), ("fairlora-exact", "fairlora-paper")):
        pairs[f"{a} - {b}"] = {}
        for k in ("auc", "es_auc", "worst_group_auc", "dpd", "eod"):
            d = finals[a][k] - finals[b][k]
            pairs[f"{a} - {b}"][k] = [float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0, int((d > 0).sum()), len(d)]
    return {"table": table, "paired": pairs}


def run_setting(setting: Setting, seeds: int) -> dict:
    runs: dict = {rule: {} for rule in ("central", "central-grouped", *RULES)}
    checks, base = [], []
    for seed in range(seeds):
        checks.append(per_group_check(setting, seed))
        base_report = evaluate(setting.base(), setting, setting.pooled(seed, 1))
        base.append(base_report)
        runs["central"][seed] = {"final": central(setting, seed, 1)}
        runs["central-grouped"][seed] = {"final": central(setting, seed, 2)}
        target = base_report["auc"] + 0.9 * (runs["central"][seed]["final"]["auc"] - base_report["auc"])
        for rule in RULES:
            started = time.time()
            out = federated(setting, rule, seed)
            out["final"] = out["curve"][-1]
            out["rounds_to_90"] = rounds_to(out["curve"], target)
            runs[rule][seed] = out
            print(f"{setting.name} seed {seed} {rule:15s} AUC {out['final']['auc']:.4f} "
                  f"agg err {np.mean(out['agg_error']):.3f} (of update {np.mean(out['agg_error_update']):.3f}) r90 {out['rounds_to_90']} ({time.time() - started:.0f}s)",
                  flush=True)
    summary = summarise(runs, setting.rounds)
    summary["frozen_base_auc"] = [float(np.mean([b["auc"] for b in base])), float(np.std([b["auc"] for b in base], ddof=1))]
    summary["headroom_auc"] = float(summary["table"]["central"]["auc"][0] - summary["frozen_base_auc"][0])
    summary["per_group_check"] = {k: float(np.mean([c[k] for c in checks])) for k in checks[0]}
    return {"summary": summary, "runs": runs}


def markdown(name: str, summary: dict) -> str:
    """The docs table of one setting: mean ± std over seeds, then paired differences."""
    fmt = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    cols = ("auc", "auc_g0", "auc_g1", "es_auc", "worst_group_auc", "xauc_g0_g1", "xauc_g1_g0", "dpd", "eod")
    lines = [
        f"**{name}**: frozen base AUC {summary['frozen_base_auc'][0]:.3f}, central headroom "
        f"{100 * summary['headroom_auc']:+.1f} AUC points. Per-group check (logistic regression, AUC on each "
        "group): pooled " + ", ".join(f"g{g} {summary['per_group_check'][f'pooled_auc_g{g}']:.3f}" for g in (0, 1))
        + "; per-group " + ", ".join(f"g{g} {summary['per_group_check'][f'per_group_auc_g{g}']:.3f}" for g in (0, 1)) + ".",
        "",
        "| rule | " + " | ".join(cols) + " | agg. error (of M) | agg. error (of update), mean / round 1 | rounds to 90% (seeds) |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for rule, row in summary["table"].items():
        cells = [fmt(row[c]) for c in cols]
        if "agg_error" in row:
            r90 = row["rounds_to_90"]
            cells += [fmt(row["agg_error"]),
                      f"{row['agg_error_update'][0]:.3f} / {row['agg_error_update_round1'][0]:.3f}",
                      f"{r90[0]:.1f} (reached in {r90[1]})" if r90[0] is not None else "not reached"]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    lines += ["", "| paired difference | " + " | ".join(("auc", "es_auc", "worst_group_auc", "dpd", "eod")) + " |",
              "|---" * 6 + "|"]
    for pair, diffs in summary["paired"].items():
        cells = [f"{d[0]:+.4f} ± {d[1]:.4f} ({d[2]}/{d[3]} > 0)" for d in diffs.values()]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--adult-rounds", type=int, default=10)
    parser.add_argument("--scanner-rounds", type=int, default=20)
    parser.add_argument("--settings", default="scanners,adult")
    parser.add_argument("--out", default="results/fairness_experiment.json")
    parser.add_argument("--table-from", help="print the markdown tables of a results file and exit")
    args = parser.parse_args()
    if args.table_from:
        stored = json.loads(Path(args.table_from).read_text())
        for name in ("scanners", "adult"):
            if name in stored:
                print(markdown(name, stored[name]["summary"]) + "\n")
        return
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    makers = {"adult": lambda: adult_setting(args.adult_rounds), "scanners": lambda: scanner_setting(args.scanner_rounds)}
    results = {"command": " ".join(sys.argv), "seconds": {}}
    for name in args.settings.split(","):
        started = time.time()
        results[name] = run_setting(makers[name](), args.seeds)
        results["seconds"][name] = time.time() - started
        print(json.dumps(results[name]["summary"], indent=1), flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float))
    print(f"written {path}")


if __name__ == "__main__":
    main()
