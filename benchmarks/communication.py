"""Bytes per round and final accuracy: no compression, uniform codecs, L-GreCo (alpha = 1).

Run from the repository root (about 15 minutes on 2 CPU cores, 3 paired seeds; run
``--settings adult`` and ``--settings digits-transformer`` as two processes for 10)::

    python benchmarks/communication.py --out results/communication.json

Every method runs on the same seeds (split, base, adapter initialisation and the
clients' codec randomness drawn from the seed), and the tables give mean [min, max]
over seeds; ratios against the uniform reference are paired per seed. L-GreCo
``lgreco:<default>`` is compared with ``uniform:<default>``, the setting its budget
is taken from, bytes including its tables.

Every run is ``strategy.start`` on an :class:`~fedlowrank.strategies.testing.InProcessGrid`:
the same ``LGreCo``/``FedLowRank`` methods and the same ``build_client_app`` client code
(``clients/compression.py``) as ``flwr run``. Bytes are read from the train replies that
really came back: the summed ``nbytes`` of every array in each reply's ArrayRecord (encoded
tensors, their specs and, in allocation rounds, the float32 error tables and energies), the same count as
LGReCo's ``lgreco-bytes`` metric (checked for every round).

Settings
--------
``adult``
    The default simulation (``simulations/adult-married``, its ``pyproject.toml`` run
    config): 5 sites, FedLowRank, rank-4 adapters on the two hidden layers of an MLP
    and a trained head: 8 tensors, 8 rounds. Accuracy: pooled site test rows.
``digits-transformer``
    A 2-layer transformer encoder (d = 64, 4 heads, FFN 128) on sklearn's bundled 8x8
    digits, image rows as 8 tokens. Rank-8 adapters on q/k/v/out and both FFN linears of
    both layers (12 adapted linears, 36 factor tensors of shapes 64x8, 128x8, 1x8) and the
    10-class head trained fully: 38 compressed tensors. The base is pretrained (all
    weights) on digits 0-5 from a disjoint 40% of the training pool; the 5 sites hold the
    other 60%, all ten digits, split by a Dirichlet(0.5) draw over labels, so fine-tuning
    has to learn four new classes. 20 rounds, 2 local epochs, lr 5e-3. Accuracy: held-out 30%.

Measured error
--------------
Each client reports ``lgreco-residual-norm`` (``||x - decode(C(x))||`` for
``x = update + previous residual``, i.e. exactly this round's compression error) and
``lgreco-target-norm`` (``||x||``). The measured relative error of a round is
``sum residual^2 / sum target^2`` over the clients. The allocator's own estimate
(from the averaged tables: chosen vs uniform-default error and size) is reported
for each allocation round.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, MessageType, MetricRecord
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from experiment_settings import DigitsTransformer  # noqa: E402

from fedlowrank.adapters import exchange_state, inject_adapters, load_exchange_state
from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, from_record, predict, to_record
from fedlowrank.compression import ENERGY_KEY, ERRORS_KEY
from fedlowrank.strategies import FedLowRank, LGreCo
from fedlowrank.runconfig import RunSettings
from fedlowrank.strategies.serverapp import central_evaluation, with_compression
from fedlowrank.compression.controller import DEFAULT_CANDIDATES
from fedlowrank.strategies.testing import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "simulations" / "adult-married"
sys.path.insert(0, str(SIM))
from adult_married import client_app as adult_client  # noqa: E402
from adult_married import server_app as adult_server  # noqa: E402

# The uniform baselines, each also an L-GreCo budget reference: a lossier and a more
# faithful setting for PowerSGD and Top-K, QSGD's 4 bits and sq's 3 bits (about the same
# error). Adult's adapters have rank 4, where powersgd:4 is lossless (no baseline).
UNIFORM = {
    "adult": ("powersgd:2", "topk:0.1", "topk:0.3", "qsgd:4", "sq:3"),
    "digits-transformer": ("powersgd:2", "powersgd:4", "topk:0.1", "topk:0.3", "qsgd:4", "sq:3"),
}
GRIDS = {
    # Adds Top-K below 5% and powersgd:6: under error feedback such Top-K settings defer
    # nearly all of a tensor's update, its residual grows round after round, and the
    # realised error climbs far above the allocation round's estimate.
    "fine": (
        "none",
        *(f"powersgd:{k}" for k in (1, 2, 3, 4, 6)),
        *(f"topk:{d}" for d in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)),
        *(f"qsgd:{b}" for b in (2, 3, 4, 6, 8)),
        *(f"sq:{b}" for b in (1, 2, 3, 4)),
    ),
    # LGreCo's default candidates.
    "moderate": DEFAULT_CANDIDATES,
}
CANDIDATES = GRIDS["moderate"]
TABLE_KEYS = (ERRORS_KEY, ENERGY_KEY)
# L-GreCo knobs (CLI): what the allocator budgets, how often it re-allocates, and how far
# the interval may grow while allocations leave the settings unchanged (1 = fixed).
LGRECO_OPTIONS = {"error_model": "feedback", "reallocate_every": 5, "max_interval_factor": 4, "budget_anchor": "current"}
# Final accuracy = mean over the last rounds (CLI --final-window).
FINAL_WINDOW = 3


# --------------------------------------------------------------------------- the loop


class RecordingGrid(InProcessGrid):
    """An in-process Grid that keeps every round's train replies (what travelled)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_replies: list[list] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_replies.append(replies)
        return replies


def reply_bytes(reply) -> tuple[int, int, int]:
    """(all array bytes, table bytes, serialised bytes) of one train reply.

    The serialised count is what Flower puts in each Array's ``data`` (the
    ``.npy`` bytes, header included): closer to the wire than ``nbytes``.
    """
    record = next(iter(reply.content.array_records.values()))
    total = sum(int(a.numpy().nbytes) for a in record.values())
    tables = sum(int(record[k].numpy().nbytes) for k in TABLE_KEYS if k in record)
    serialised = sum(len(a.data) for a in record.values())
    return total, tables, serialised


def measured_error(replies) -> float | None:
    """Sum of squared compression errors over sum of squared targets, this round."""
    metrics = [r.content["metrics"] for r in replies]
    if not metrics or "lgreco-residual-norm" not in metrics[0]:
        return None
    err = sum(float(m["lgreco-residual-norm"]) ** 2 for m in metrics)
    sig = sum(float(m["lgreco-target-norm"]) ** 2 for m in metrics)
    return err / sig if sig > 0 else 0.0


def allocator_estimate(strategy: LGreCo, rnd: int) -> dict | None:
    """The allocation's estimated error and size relative to the uniform default."""
    if rnd not in strategy.allocation_details:
        return None
    settings = strategy.allocation_history[rnd]
    counts = {c: sum(v == c for v in settings.values()) for c in sorted(set(settings.values()))}
    return {"round": rnd, **strategy.allocation_details[rnd], "settings": counts}


def run(app, num_sites: int, run_config: dict, strategy, initial, rounds: int, train_config: dict, accuracy_fn) -> dict:
    """One federated run; per-round bytes, measured error, accuracy."""
    grid = RecordingGrid(app, [{"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)], run_config)
    curve: list[float] = []
    random.seed(0)  # FedAvg samples (and orders) nodes with Python's random: keep runs paired

    def evaluate_fn(server_round, arrays):
        curve.append(accuracy_fn(arrays))
        return MetricRecord({"acc": curve[-1]})

    started = time.time()
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=ConfigRecord(train_config), evaluate_fn=evaluate_fn
    )
    per_round = []
    for rnd, replies in enumerate(grid.train_replies, start=1):
        counted = [reply_bytes(r) for r in replies]
        total = sum(c[0] for c in counted)
        metrics = result.train_metrics_clientapp.get(rnd, {})
        if "lgreco-bytes" in metrics and int(metrics["lgreco-bytes"]) != total:
            raise RuntimeError(f"round {rnd}: counted {total} bytes, LGreCo reported {metrics['lgreco-bytes']}")
        per_round.append(
            {
                "round": rnd,
                "bytes": total,
                "table_bytes": sum(c[1] for c in counted),
                "serialized_bytes": sum(c[2] for c in counted),
                "measured_error": measured_error(replies),
                "residual_norm": _mean_metric(replies, "lgreco-residual-norm"),
                "update_norm": _mean_metric(replies, "lgreco-update-norm"),
            }
        )
    estimates = []
    if isinstance(strategy, LGreCo) and len(strategy.candidates) > 1:
        estimates = [e for rnd in range(1, len(grid.train_replies) + 1) if (e := allocator_estimate(strategy, rnd))]
    return {"rounds": per_round, "accuracy": curve, "allocations": estimates, "seconds": time.time() - started}


def _mean_metric(replies, key) -> float | None:
    vals = [float(r.content["metrics"][key]) for r in replies if key in r.content["metrics"]]
    return float(np.mean(vals)) if vals else None


def method_list(setting: str) -> list[str]:
    uniform = UNIFORM[setting]
    return ["none", *[f"uniform:{u}" for u in uniform], *[f"lgreco:{u}" for u in uniform]]


def wrap(inner, method: str):
    """The inner strategy under the method's compression.

    ``none``; ``uniform:<codec>:<setting>``; ``lgreco:<default>`` (alpha = 1) or
    ``lgreco:<default>@<alpha>`` (the budget is alpha times the default's error).
    """
    if method == "none":
        return inner
    if method.startswith("uniform:"):
        return with_compression(inner, RunSettings(compression=method))
    default, _, alpha = method.split(":", 1)[1].partition("@")
    return LGreCo(inner, candidates=CANDIDATES, default=default, alpha=float(alpha or 1.0), **LGRECO_OPTIONS)


# --------------------------------------------------------------------------- adult


def adult_setting(rounds: int | None, seed: int = 0):
    """The default simulation's run config, client app, initial arrays and evaluation.

    ``seed`` replaces the run config's ``seed`` (site split, loader order, adapter
    initialisation, the clients' codec randomness); the pretrained base is the same.
    """
    cfg = tomllib.loads((SIM / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg["seed"] = int(cfg["seed"]) + seed
    rounds = rounds or int(cfg["num-server-rounds"])
    rank, seed, sites = int(cfg["rank"]), int(cfg["seed"]), 5
    evaluate = central_evaluation(adult_server.global_model(rank), adult_server.central_test(cfg, sites), torch.device("cpu"))

    def accuracy(arrays) -> float:
        return float(evaluate(0, arrays)["acc"])

    def make(method: str):
        torch.manual_seed(seed)  # the same adapter initialisation for every method
        initial = to_record(exchange_state(adult_server.global_model(rank)))
        # Central evaluation only (fraction_evaluate = 0), to keep the CPU budget.
        inner = FedLowRank(rank=rank, fraction_evaluate=0.0)
        # The simulation's own switch for "none"/"uniform:..." (run config key ``compression``).
        strategy = wrap(inner, method)
        return strategy, initial

    train_config = {"lr": float(cfg["lr"]), "local-epochs": int(cfg["local-epochs"])}
    return adult_client.app, sites, dict(cfg), make, rounds, train_config, accuracy


# --------------------------------------------------------------------------- digits transformer


# The digits transformer is the experiment runner's (one definition for both benchmarks).


DIGITS_TARGETS = r"blocks\.\d+\.(q|k|v|o|ff1|ff2)"
DIGITS_TRAINABLE = r"head\..*"
DIGITS_RANK = 8


def digits_split(seed: int = 0, sites: int = 5):
    """Pretraining rows (digits 0-5), per-site fine-tuning rows, held-out test rows."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, pool = order[: int(0.3 * len(y))], order[int(0.3 * len(y)) :]
    cut = int(0.4 * len(pool))
    pretrain = pool[:cut][y[pool[:cut]] <= 5]
    finetune = pool[cut:]
    parts: list[list[int]] = [[] for _ in range(sites)]
    for label in range(10):
        rows = rng.permutation(finetune[y[finetune] == label])
        cuts = (np.cumsum(rng.dirichlet(np.full(sites, 0.5)))[:-1] * len(rows)).astype(int)
        for site, chunk in enumerate(np.split(rows, cuts)):
            parts[site].extend(chunk.tolist())
    xt = torch.tensor(x / 16.0, dtype=torch.float32)
    return xt, torch.tensor(y), pretrain, [np.array(p) for p in parts], test


def batches(x, y, rows, batch_size: int, shuffle: bool, seed: int = 0) -> list:
    rows = np.random.default_rng(seed).permutation(rows) if shuffle else np.asarray(rows)
    zeros = torch.zeros(len(rows), dtype=torch.long)
    return [(x[rows[i : i + batch_size]], y[rows[i : i + batch_size]], zeros[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def pretrain_base(x, y, rows, epochs: int = 40, seed: int = 0) -> dict:
    """Train every weight of the base on digits 0-5; returns its state dict."""
    torch.manual_seed(seed)
    model = DigitsTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        for xb, yb, _ in batches(x, y, rows, 64, True, seed + epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def digits_setting(rounds: int | None, seed: int = 0):
    """The digits transformer; ``seed`` draws the split, the base, the adapters and the clients' codec randomness."""
    x, y, pre_rows, site_rows, test_rows = digits_split(seed)
    started = time.time()
    base_state = pretrain_base(x, y, pre_rows, seed=seed)
    logging.getLogger(__name__).info("pretrained the digits base in %.1fs", time.time() - started)

    def base(_context=None) -> DigitsTransformer:
        model = DigitsTransformer()
        model.load_state_dict(base_state)
        return model

    def data_fn(context) -> ClientData:
        site = int(context.node_config["partition-id"])
        # A fresh order every call would also do; a fixed seed keeps methods paired.
        return ClientData(batches(x, y, site_rows[site], 32, True, seed=1000 * seed + site), batches(x, y, site_rows[site], 256, False))

    adapter = AdapterConfig(DIGITS_TARGETS, rank=DIGITS_RANK, trainable=DIGITS_TRAINABLE)
    app = build_client_app(base, data_fn, adapter)
    eval_model = adapted_digits(base)
    test_batches = batches(x, y, test_rows, 512, False)

    def accuracy(arrays) -> float:
        load_exchange_state(eval_model, from_record(arrays))
        pred = predict(eval_model, test_batches, torch.device("cpu"))
        return float(np.mean(pred.scores.argmax(1) == pred.labels))

    def make(method: str):
        torch.manual_seed(seed)
        initial = to_record(exchange_state(adapted_digits(base)))
        return wrap(FedLowRank(rank=DIGITS_RANK, fraction_evaluate=0.0), method), initial

    # run config "seed": the clients' error-feedback seeds (clients/compression.client_seed).
    return app, len(site_rows), {"seed": seed}, make, rounds or 20, {"lr": 5e-3, "local-epochs": 2}, accuracy


def adapted_digits(base) -> nn.Module:
    model = base()
    inject_adapters(model, DIGITS_TARGETS, rank=DIGITS_RANK, trainable=DIGITS_TRAINABLE)
    return model


# --------------------------------------------------------------------------- summary


def summarise(runs: dict) -> dict:
    """One seed: mean bytes per round (with and without tables), mean measured error, accuracy."""
    out = {}
    for method, res in runs.items():
        rounds = res["rounds"]
        errs = [r["measured_error"] for r in rounds if r["measured_error"] is not None]
        out[method] = {
            "bytes_per_round": float(np.mean([r["bytes"] for r in rounds])),
            "bytes_per_round_without_tables": float(np.mean([r["bytes"] - r["table_bytes"] for r in rounds])),
            "serialized_bytes_per_round": float(np.mean([r["serialized_bytes"] for r in rounds])),
            # Rounds whose replies carried tables (allocation rounds, incl. retries).
            "table_rounds": int(sum(r["table_bytes"] > 0 for r in rounds)),
            "measured_error": float(np.mean(errs)) if errs else 0.0,
            # Mean of the last FINAL_WINDOW rounds: uncompressed digits swings by up to 6
            # points between consecutive rounds, more than the 1-point target can resolve.
            "final_accuracy": float(np.mean(res["accuracy"][1:][-FINAL_WINDOW:])),
            "last_round_accuracy": res["accuracy"][-1],
            "initial_accuracy": res["accuracy"][0],
        }
    for method, s in out.items():
        if "none" in out:
            s["accuracy_gap_vs_none"] = s["final_accuracy"] - out["none"]["final_accuracy"]
        if method.startswith("lgreco:") and "uniform:" + method.split(":", 1)[1] in out:
            # The reference: the uniform default L-GreCo is budgeted against.
            ref = out["uniform:" + method.split(":", 1)[1]]
            s["bytes_reduction_vs_uniform"] = ref["bytes_per_round"] / s["bytes_per_round"]
            s["serialized_reduction_vs_uniform"] = ref["serialized_bytes_per_round"] / s["serialized_bytes_per_round"]
            s["error_vs_uniform"] = s["measured_error"] / max(ref["measured_error"], 1e-30)
            s["target_met"] = bool(
                s["bytes_reduction_vs_uniform"] >= 1.5
                and s["error_vs_uniform"] <= 1.0
                and s.get("accuracy_gap_vs_none", 0.0) >= -0.01
            )
    return out


def combine(per_seed: list[dict]) -> dict:
    """Across paired seeds: mean, min and max of every figure (ratios are paired per seed)."""
    out = {}
    for method in per_seed[0]:
        fields = {}
        for key, value in per_seed[0][method].items():
            vals = [float(s[method][key]) for s in per_seed]
            fields[key] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
        if "target_met" in per_seed[0][method]:
            fields["target_met_seeds"] = int(sum(s[method]["target_met"] for s in per_seed))
        out[method] = fields
    base = [float(s["none"]["initial_accuracy"]) for s in per_seed if "none" in s]
    none = [float(s["none"]["final_accuracy"]) for s in per_seed if "none" in s]
    if base:
        # Room fine-tuning has to help: accuracy without compression minus the frozen base.
        out["headroom"] = {"mean": float(np.mean(np.subtract(none, base))), "min": float(np.min(np.subtract(none, base))), "max": float(np.max(np.subtract(none, base)))}
    return out


def _fmt(stat: dict, scale: float = 1.0, digits: int = 0, suffix: str = "") -> str:
    mean, lo, hi = (scale * stat[k] for k in ("mean", "min", "max"))
    return f"{mean:.{digits}f}{suffix} [{lo:.{digits}f}, {hi:.{digits}f}]"


def print_table(name: str, combined: dict, seeds: int) -> None:
    print(f"\n## {name} ({seeds} paired seeds: mean [min, max])")
    if "headroom" in combined:
        print(f"headroom (none - base accuracy, points): {_fmt(combined['headroom'], 100, 2)}")
    print("| method | bytes/round (incl. tables) | w/o tables | serialised (.npy) | measured rel. error | final acc (%) | acc vs none (pts) | vs uniform: bytes reduction | error ratio | target met |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, s in combined.items():
        if method == "headroom":
            continue
        cols = [
            _fmt(s["bytes_per_round"]),
            _fmt(s["bytes_per_round_without_tables"]),
            f"{s['serialized_bytes_per_round']['mean']:.0f}",
            _fmt(s["measured_error"], digits=3),
            _fmt(s["final_accuracy"], 100, 2),
            _fmt(s["accuracy_gap_vs_none"], 100, 2) if "accuracy_gap_vs_none" in s else "",
            _fmt(s["bytes_reduction_vs_uniform"], digits=2, suffix="x") if "bytes_reduction_vs_uniform" in s else "",
            _fmt(s["error_vs_uniform"], digits=2) if "error_vs_uniform" in s else "",
            f"{s['target_met_seeds']}/{seeds}" if "target_met_seeds" in s else "",
        ]
        print(f"| {method} | " + " | ".join(cols) + " |")


def record_tables(path: Path) -> None:
    """Record what every L-GreCo allocation decided from: the recorded-table tests replay it."""
    import fedlowrank.strategies.lgreco as lgreco_module

    inner = lgreco_module.allocate_or_uniform
    records: list[dict] = []

    def recording(errors, sizes, budget, table_cost=0.0, num_bins=1000):
        records.append({"errors": np.asarray(errors).tolist(), "sizes": np.asarray(sizes).tolist(),
                        "budget": float(budget), "table_cost": float(table_cost), "candidates": list(CANDIDATES)})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records))
        return inner(errors, sizes, budget, table_cost=table_cost, num_bins=num_bins)

    lgreco_module.allocate_or_uniform = recording


def main() -> None:
    global CANDIDATES, FINAL_WINDOW  # noqa: PLW0603 (CLI choices read by wrap() and summarise())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="adult,digits-transformer")
    parser.add_argument("--methods", default=None, help="comma-separated; default: none, then uniform:<d> and lgreco:<d> for each of the setting's defaults")
    parser.add_argument("--seeds", default="0,1,2", help="paired seeds (every method runs on each)")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds of every setting")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="moderate", help="L-GreCo's candidate settings")
    parser.add_argument("--error-model", choices=("feedback", "oneshot"), default="feedback")
    parser.add_argument("--budget-anchor", choices=("current", "warmup"), default="current")
    parser.add_argument("--final-window", type=int, default=FINAL_WINDOW, help="final accuracy: mean of the last N rounds")
    parser.add_argument("--reallocate-every", type=int, default=5)
    parser.add_argument(
        "--max-interval-factor", type=int, default=4, help="interval cap (x reallocate-every) while unchanged; 1 = fixed"
    )
    parser.add_argument("--out", default="results/communication.json")
    parser.add_argument("--record-tables", default=None,
                        help="also write every allocation's pooled tables, budget and table cost here (JSON)")
    args = parser.parse_args()
    if args.record_tables:
        record_tables(ROOT / args.record_tables)
    CANDIDATES = GRIDS[args.grid]
    if args.final_window < 1:
        parser.error("--final-window must be >= 1")
    FINAL_WINDOW = args.final_window
    LGRECO_OPTIONS.update(
        error_model=args.error_model,
        reallocate_every=args.reallocate_every,
        max_interval_factor=args.max_interval_factor,
        budget_anchor=args.budget_anchor,
    )
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    builders = {"adult": adult_setting, "digits-transformer": digits_setting}
    seeds = [int(x) for x in args.seeds.split(",")]
    report = {"command": " ".join(sys.argv), "candidates": list(CANDIDATES), "lgreco": dict(LGRECO_OPTIONS), "final_window": FINAL_WINDOW, "seeds": seeds, "settings": {}}
    started = time.time()
    for name in args.settings.split(","):
        per_seed, all_runs = [], {}
        for seed in seeds:
            app, sites, run_config, make, rounds, train_config, accuracy = builders[name](args.rounds, seed)
            runs = {}
            for method in args.methods.split(",") if args.methods else method_list(name):
                strategy, initial = make(method)
                runs[method] = run(app, sites, run_config, strategy, initial, rounds, train_config, accuracy)
                print(f"{name} seed {seed} {method}: {runs[method]['seconds']:.1f}s acc {runs[method]['accuracy'][-1]:.4f}", flush=True)
            per_seed.append(summarise(runs))
            all_runs[seed] = runs
        combined = combine(per_seed)
        report["settings"][name] = {"rounds": rounds, "combined": combined, "per_seed": per_seed, "runs": all_runs}
        print_table(name, combined, len(seeds))
    report["seconds"] = time.time() - started
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten {out} in {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
