"""The experiment runner: paired seeds, headroom, rounds/bytes to 90%, paired intervals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
from experiment_summary import markdown, sign_test, summarise, t_interval


def synthetic(finals_a, finals_b, rounds=4):
    """Results where rule a climbs to finals_a and b to finals_b; base 0.5, central 0.9."""
    seeds = {}
    for i, (fa, fb) in enumerate(zip(finals_a, finals_b)):
        def curve(final):
            values = np.linspace(0.5, final, rounds + 1)
            return [{"round": r, "acc": float(v), "bytes": 0 if r == 0 else 1000, "product_norm_max": 1.0, "agg_error": None}
                    for r, v in enumerate(values)]
        seeds[str(i)] = {"central": {"G1": {"acc": 0.9}}, "runs": {"a": curve(fa), "b": curve(fb)}}
    return {"setting": "toy", "regime": {"rounds": rounds, "lr": 0.01, "local_epochs": 1, "init": "lora", "rank": 4,
                                         "client_ranks": [], "sites": 5, "fraction": 1.0},
            "rules": ["a", "b"], "seeds": seeds}


def test_paired_interval_and_sign_test_match_an_independent_computation():
    diffs = np.array([0.02, 0.01, 0.03, -0.005, 0.015, 0.02, 0.01, 0.0, 0.025, 0.012])
    mean, lo, hi = t_interval(diffs)
    n, sd = len(diffs), diffs.std(ddof=1)
    half = 2.2621571627409915 * sd / math.sqrt(n)  # t_{0.975, 9}
    assert mean == pytest.approx(diffs.mean()) and lo == pytest.approx(mean - half) and hi == pytest.approx(mean + half)
    # 8 wins, 1 loss, 1 tie: two-sided binomial p = 2 * P(X <= 1 | n=9) = 2 * 10 / 512.
    assert sign_test(diffs) == pytest.approx(20 / 512)


def test_summary_pairs_rules_and_finds_rounds_and_bytes_to_90_percent_of_headroom():
    results = synthetic([0.9, 0.9, 0.9], [0.8, 0.82, 0.84])
    summary = summarise(results, reference="a")
    assert summary["headroom"][0] == pytest.approx(0.4)
    a, b = summary["rules"]["a"], summary["rules"]["b"]
    # a: 0.5, 0.6, 0.7, 0.8, 0.9 -> target 0.86 reached at round 4, 4 rounds x 1000 bytes.
    assert a["rounds90_reached"] == 3 and a["rounds90_median"] == 4 and a["bytes90_median"] == 4000
    assert b["rounds90_reached"] == 0 and b["bytes90_median"] is None  # censored at rounds + 1
    assert b["vs_reference"]["wins"] == 0 and b["vs_reference"]["losses"] == 3
    assert b["vs_reference"]["diff"][0] == pytest.approx(-0.08)
    assert b["vs_reference"]["rounds90_diff"][0] == pytest.approx(1.0)
    text = markdown(summary, "toy")
    assert "headroom +40.00" in text and "| b |" in text and "0/3" in text


# The digits transformer's weights: embed 8x64+64, pos 8x64, per block 4 (64x64+64) + 64x128+128
# + 128x64+64 + 2 LayerNorms (2x64 each), final LayerNorm 2x64, head 64x10+10.
# Each of its 39 tensors travels as a .npy buffer with a 128-byte header.
DIGITS_TENSORS = 2 + 1 + 2 * 16 + 2 + 2
DIGITS_WEIGHTS = 8 * 64 + 64 + 8 * 64 + 2 * (4 * (64 * 64 + 64) + 64 * 128 + 128 + 128 * 64 + 64 + 4 * 64) + 2 * 64 + 64 * 10 + 10


@pytest.mark.filterwarnings("ignore")
def test_the_runner_writes_paired_per_round_results(tmp_path):
    out = tmp_path / "run.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "experiment.py"), "run", "--setting", "digits", "--rules", "fedit,exact,exact/align=true,fedavg-full",
         "--seeds", "0-1", "--rounds", "1", "--workers", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert sorted(results["seeds"]) == ["0", "1"]
    for seed in results["seeds"].values():
        runs = seed["runs"]
        # Paired: both rules start from the same frozen base and the same adapters.
        assert runs["fedit"][0]["acc"] == runs["exact"][0]["acc"]
        assert [p["round"] for p in runs["exact"]] == [0, 1]
        assert runs["exact"][1]["bytes"] > 0 and runs["exact"][0]["product_norm_max"] == 0.0
        assert runs["exact"][1]["product_norm_max"] > 0.0 and seed["central"]["G1"]["acc"] > runs["exact"][0]["acc"]
        # The same rule under another name: identical curves, so every rule of a seed starts
        # from the same adapters, batches and sampling whatever ran before it.
        assert runs["exact/align=true"] == runs["exact"]
        # Full-model FedAvg starts from the same model and sends every weight of it, 5 sites.
        full = runs["fedavg-full"]
        assert full[0]["acc"] == runs["exact"][0]["acc"] and full[0]["product_norm_max"] == 0.0
        assert full[1]["bytes"] == 5 * (4 * DIGITS_WEIGHTS + 128 * DIGITS_TENSORS) and full[1]["product_norm_max"] > 0.0
    summary = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "experiment.py"), "summary", str(out), "--reference", "exact",
         "--markdown", str(tmp_path / "r.md"), "--plots", str(tmp_path / "plots")],
        capture_output=True, text=True, timeout=120,
    )
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert "| fedit |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "plots" / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_blocks_of_seeds_pool_and_a_setting_without_a_complete_seed_is_named(tmp_path):
    from experiment_summary import merged

    blocks = [synthetic([0.9, 0.9], [0.8, 0.85]), synthetic([0.9, 0.9], [0.86, 0.87])]
    blocks[1]["seeds"] = {str(int(s) + 10): {**e, "seed": int(s) + 10} for s, e in blocks[1]["seeds"].items()}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, results in zip(paths, blocks):
        path.write_text(json.dumps(results))
    [(_, results)] = merged([str(p) for p in paths])
    assert sorted(results["seeds"], key=int) == ["0", "1", "10", "11"]
    assert summarise(results, reference="a")["rules"]["b"]["vs_reference"]["diff"][0] == pytest.approx(-0.055)
    only_c = synthetic([0.9], [0.8])
    only_c["rules"] = ["c"]
    only_c["seeds"] = {"5": {**only_c["seeds"]["0"], "runs": {"c": only_c["seeds"]["0"]["runs"]["b"]}}}
    (tmp_path / "c.json").write_text(json.dumps(only_c))
    with pytest.raises(SystemExit, match="no seed on which every rule"):
        merged([str(paths[0]), str(tmp_path / "c.json")])


def test_files_of_the_same_setting_and_regime_merge_on_their_common_seeds(tmp_path):
    from experiment_summary import merged

    first = synthetic([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
    second = synthetic([0.9, 0.9], [0.85, 0.86])
    second["rules"] = ["c"]
    for seed in second["seeds"].values():
        seed["runs"] = {"c": seed["runs"]["b"]}
    paths = [tmp_path / "one.json", tmp_path / "two.json"]
    for path, results in zip(paths, (first, second)):
        path.write_text(json.dumps(results))
    [(name, results)] = merged([str(p) for p in paths])
    assert name == str(paths[0]) and results["rules"] == ["a", "b", "c"] and sorted(results["seeds"]) == ["0", "1"]
    summary = summarise(results, reference="a")
    assert summary["rules"]["c"]["vs_reference"]["diff"][0] == pytest.approx((-0.05 - 0.04) / 2)


@pytest.mark.filterwarnings("ignore")
def test_full_model_fedavg_starts_from_the_pretrained_weights_under_a_pissa_start():
    from experiment import run_seed
    from experiment_settings import Regime

    result = run_seed("digits", Regime(rounds=1, init="pissa"), ["exact", "fedavg-full"], seed=3)
    exact, full = result["runs"]["exact"], result["runs"]["fedavg-full"]
    # PiSSA moves the top of each weight into the adapter; the full model gets it back, so
    # both start where the pretrained base was (float32 rounding may flip one test digit).
    assert abs(full[0]["acc"] - exact[0]["acc"]) <= 1 / 539 and exact[0]["product_norm_max"] > 1.0
    assert full[0]["product_norm_max"] == 0.0 and full[1]["product_norm_max"] > 0.0


def test_a_run_whose_clients_refused_the_global_counts_as_diverged():
    results = synthetic([0.9, 0.9], [0.88, 0.87])
    results["seeds"]["1"]["runs"]["b"][2]["client_errors"] = 3  # clients refused an out-of-range global
    summary = summarise(results, reference="a")
    assert summary["rules"]["b"]["diverged"] == 1 and summary["rules"]["a"]["diverged"] == 0


def test_rules_with_several_options_survive_the_comma_separated_list():
    from experiment import parse_rule, split_rules

    rules = split_rules("fedit, exact/momentum=0.9,server_learning_rate=0.3,zero-pad,exact/gauge=lora")
    assert rules == ["fedit", "exact/momentum=0.9,server_learning_rate=0.3", "zero-pad", "exact/gauge=lora"]
    assert parse_rule(rules[1]) == ("exact", {"momentum": 0.9, "server_learning_rate": 0.3})


def test_leave_one_setting_out_chooses_without_the_held_out_setting():
    """'steady' is never far behind the baseline; 'bold' wins big in two settings and collapses in
    the third. Judged on the collapse setting, the choice made on the other two is 'bold' (it never
    saw the collapse); judged on either other, the collapse counts and 'steady' is chosen."""
    from experiment_summary import leave_one_setting_out

    def setting(finals: dict[str, list[float]]) -> dict:
        seeds = {str(s): {"runs": {rule: [{"acc": 0.5}, {"acc": values[s]}] for rule, values in finals.items()}}
                 for s in range(4)}
        return {"seeds": seeds}

    base = [0.70, 0.71, 0.69, 0.70]
    plus = lambda d: [v + d for v in base]  # noqa: E731
    settings = {
        "a": setting({"fedit": base, "steady": plus(0.01), "bold": plus(0.05)}),
        "b": setting({"fedit": base, "steady": plus(0.00), "bold": plus(0.04)}),
        "collapse": setting({"fedit": base, "steady": plus(-0.01), "bold": plus(-0.20)}),
    }
    rows = {r["held_out"]: r for r in leave_one_setting_out(settings, ["steady", "bold"], ["fedit"])}
    assert rows["collapse"]["chosen"] == "bold" and rows["collapse"]["diff"] == pytest.approx(-0.20)
    assert rows["a"]["chosen"] == "steady" and rows["b"]["chosen"] == "steady"
    assert rows["a"]["diff"] == pytest.approx(0.01) and rows["a"]["baseline"] == "fedit"


def test_the_densenet_setting_adapts_the_imaging_apps_layers_of_a_pretrained_base():
    from experiment import adapted
    from experiment_settings import SETTINGS, Regime, _imaging_app_model

    from fedlowrank.adapters import adapter_layers, inject_adapters

    setting = SETTINGS["fmnist-densenet"](0, Regime(rounds=1))
    names = set(adapter_layers(adapted(setting, Regime(), 1)))
    app = _imaging_app_model()
    app_net = app.GroupTaskNet(app.densenet())  # the app's own network, adapted by its own targets
    app_names = {name.removeprefix("base.") for name in inject_adapters(app_net, app.ADAPTER_TARGETS, rank=8)}
    assert names and {name.removeprefix("base.") for name in names} == app_names
    # Pretrained on classes 0-5 only: clearly above chance on ten classes, clearly below fitting them all.
    from experiment import evaluate

    accuracy = evaluate(adapted(setting, Regime(), 1), setting)["acc"]
    assert 0.3 < accuracy < 0.8


def test_the_mlp_digits_setting_shares_the_transformers_split_and_adapts_both_hidden_layers():
    from experiment_settings import SETTINGS, Regime

    from fedlowrank.adapters import adapter_layers, inject_adapters

    mlp, transformer = SETTINGS["digits-mlp"](4, Regime()), SETTINGS["digits"](4, Regime())
    assert [len(b) for b in mlp.site_train] == [len(b) for b in transformer.site_train]
    assert all(a[1].tolist() == b[1].tolist() for a, b in zip(mlp.site_train[0], transformer.site_train[0]))
    import copy

    model = copy.deepcopy(mlp.base)
    inject_adapters(model, mlp.targets, rank=4)
    assert sorted(adapter_layers(model)) == ["fc1", "fc2"]
