"""The fairlora-images app: group-dependent label rules on images, a frozen BatchNorm base."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

from fedlowrank.datasets.fashion_mnist import rule_table
import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn

from fedlowrank.adapters import inject_adapters, load_adapter
from fedlowrank.clients import train_local
from fedlowrank.training import freeze_frozen_norms
from fedlowrank.datasets.fashion_mnist import DEFAULT_ROOT
from fedlowrank.strategies.testing import InProcessGrid

pytest.importorskip("monai")  # the [imaging] extra: the app's base network and transforms

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "simulations" / "fairlora-images"
sys.path.insert(0, str(APP))
from fairlora_images import client_app, data, server_app  # noqa: E402
from fairlora_images.model import (  # noqa: E402
    ADAPTER_TARGETS, BASE_WEIGHTS, TRAINABLE, load_base_model, read_weights, write_weights,
)

HAVE_FASHION = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed")


def app_config(**overrides) -> dict:
    """The app's declared run config with overrides (as flwr run would hand it over)."""
    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**config, **overrides}


# --------------------------------------------------------------------------- rules and sites


def test_the_groups_agree_on_five_classes_and_disagree_on_five():
    classes = np.arange(10)
    a = data.relabel(classes, np.zeros(10, dtype=np.int64))
    b = data.relabel(classes, np.ones(10, dtype=np.int64))
    # T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot
    assert a.tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 0, 0]
    assert b.tolist() == [0, 0, 1, 0, 1, 1, 0, 1, 0, 1]
    assert np.flatnonzero(a != b).tolist() == [0, 5, 6, 7, 9]
    disputed = [row[0] for row in rule_table() if row[1] != row[2]]
    assert disputed == ["T-shirt/top", "Sandal", "Shirt", "Sneaker", "Ankle boot"]


def test_relabelling_refuses_unknown_groups_and_classes_by_value():
    with pytest.raises(ValueError, match=r"group ids must be 0 or 1 .* got \[-1, 2\]"):
        data.relabel(np.array([0, 1, 2]), np.array([2, -1, 0]))
    with pytest.raises(ValueError, match=r"classes must be in 0..9; got \[10\]"):
        data.relabel(np.array([10]), np.array([0]))


def test_sites_differ_in_group_mix_and_group_b_is_the_minority():
    shares = [data.group_share(p, 5) for p in range(5)]
    assert shares == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5]) and np.mean(shares) == pytest.approx(0.3)


def test_site_draws_are_disjoint_equal_seeded_and_capped_by_the_pool():
    parts = [data.site_indices(1000, p, 4, 200, seed=3) for p in range(4)]
    assert all(len(p) == 200 for p in parts)
    assert len(np.unique(np.concatenate(parts))) == 800
    np.testing.assert_array_equal(parts[2], data.site_indices(1000, 2, 4, 200, seed=3))
    assert len(data.site_indices(1000, 0, 4, 10_000, seed=3)) == 250  # at most an equal share
    with pytest.raises(ValueError, match="partition-id 4 must be in 0..3"):
        data.site_indices(1000, 4, 4, 200, seed=3)


def test_a_digits_site_has_binary_labels_by_its_groups_rules():
    train, test, train_classes, test_classes = data.site_task("digits", 1, 3, 150, seed=0)
    assert len(train) == 150 and len(test) == 38 and train.group_names == data.GROUP_NAMES
    np.testing.assert_array_equal(train.labels, data.relabel(train_classes, train.groups))
    np.testing.assert_array_equal(test.labels, data.relabel(test_classes, test.groups))
    assert set(np.unique(train.groups)) == {0, 1}


@needs_fashion
def test_no_site_sees_the_pretraining_slice():
    pretrain_rows, pool_rows = data.pretrain_split(60000)
    assert len(pretrain_rows) == data.PRETRAIN_IMAGES and not set(pretrain_rows) & set(pool_rows)
    train_pool, _ = data.source_images("fashion-mnist")
    full = data.load_fashion_mnist(DEFAULT_ROOT, "train")
    np.testing.assert_array_equal(train_pool.images, full.images[np.sort(pool_rows)])


def group_readout_auc(images: np.ndarray, groups: np.ndarray) -> float:
    """Cross-validated AUC of a logistic regression reading the group from the pixels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.metrics import roc_auc_score

    x = images.reshape(len(images), -1)
    scores = cross_val_predict(LogisticRegression(max_iter=300, C=0.1), x, groups, cv=3, method="predict_proba")[:, 1]
    return float(roc_auc_score(groups, scores))


@pytest.mark.parametrize("dataset", ["digits", pytest.param("fashion-mnist", marks=needs_fashion)])
def test_the_group_is_not_in_the_pixels(dataset):
    """Both groups' images come from one distribution: same classes, no pixel readout of the group."""
    pooled = data.pooled(dataset, 2, 600, seed=0, split="train")
    groups, classes = pooled.groups, np.concatenate([data.site_task(dataset, p, 2, 600, 0)[2] for p in range(2)])
    counts = np.stack([np.bincount(classes[groups == g], minlength=10) for g in (0, 1)])
    expected = counts.sum(0, keepdims=True) * counts.sum(1, keepdims=True) / counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, counts  # chi-square, 9 degrees of freedom, p = 0.001
    assert group_readout_auc(pooled.images, groups) < 0.6


def test_preprocessing_pads_or_resizes_to_32_and_scales_each_image():
    digits = data.site_task("digits", 0, 2, 20, seed=0)[0]
    x = data.preprocess(digits.images)
    assert x.shape == (20, 1, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x.amax(dim=(1, 2, 3)), torch.ones(20)) and float(x.min()) == 0.0
    fashion_like = np.zeros((2, 1, 28, 28), np.float32)
    fashion_like[:, :, 10:12, 3:5] = 0.5
    padded = data.preprocess(fashion_like)
    assert torch.equal(padded[:, :, 2:30, 2:30], torch.from_numpy(fashion_like * 2))  # 0.5 -> 1 by min-max


def test_training_batches_flip_some_images_left_right_and_keep_labels_and_groups():
    site = data.site_task("digits", 0, 2, 64, seed=0)[0]
    plain = next(iter(data.loader(site, 64, shuffle=False, augment=False)))
    flipped = next(iter(data.loader(site, 64, shuffle=False, augment=True)))
    same = [bool(torch.equal(a, b)) for a, b in zip(plain[0], flipped[0])]
    mirrored = [bool(torch.equal(a.flip(-1), b)) for a, b in zip(plain[0], flipped[0])]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    assert torch.equal(plain[1], flipped[1]) and torch.equal(plain[2], flipped[2])
    assert plain[1].dtype == torch.float32 and plain[2].dtype == torch.int64


def test_a_medmnist_site_file_needs_binary_grey_images(tmp_path):
    rng = np.random.default_rng(0)
    sizes = (("train", 6), ("val", 2), ("test", 4))
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in sizes}
    arrays.update({f"{s}_labels": rng.integers(0, 2, (n, 1), dtype=np.uint8) for s, n in sizes})
    np.savez(tmp_path / "site.npz", **arrays, train_groups=np.array([0, 1, 1, 0, -1, 1]), test_groups=np.array([0, 0, 1, 1]))
    train, test = data.load_site_file(tmp_path / "site.npz")
    assert train.groups.tolist() == [0, 1, 1, 0, -1, 1] and len(test) == 4
    np.savez(tmp_path / "multi.npz", **{**arrays, "train_labels": np.array([[0], [3], [1], [0], [1], [2]], np.uint8)})
    with pytest.raises(ValueError, match=r"labels must be 0/1; got \[0, 1, 2, 3\]"):
        data.load_site_file(tmp_path / "multi.npz")
    np.savez(tmp_path / "rgb.npz", **{**arrays, "train_images": rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"grey 2-D images \(N, 1, H, W\), got \(6, 3, 28, 28\)"):
        data.load_site_file(tmp_path / "rgb.npz")


# --------------------------------------------------------------------------- the frozen base


def test_the_shipped_base_is_small_and_loads_strictly():
    assert BASE_WEIGHTS.stat().st_size < 2 * 1024 * 1024
    model = load_base_model()
    names = inject_adapters(model, ADAPTER_TARGETS, rank=4, groups=2, trainable=TRAINABLE)
    assert names[-1] == "base.class_layers.out" and len(names) == 5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("head.")} == {f"{n}.lora_{f}" for n in names for f in "USV"}


def test_weights_round_trip_and_a_tampered_file_is_refused(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    path = tmp_path / "w.json"
    write_weights(path, state, {"note": "test"})
    loaded = read_weights(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    document = json.loads(path.read_text())
    document["safetensors"] = document["safetensors"][:-8] + "AAAAAAA="
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="do not match their sha256"):
        read_weights(path)
    with pytest.raises(FileNotFoundError, match="python -m fairlora_images.prepare"):
        read_weights(tmp_path / "missing.json")


def test_batchnorm_buffers_of_the_frozen_base_stay_bit_identical_after_training():
    torch.manual_seed(0)
    model = load_base_model()
    inject_adapters(model, ADAPTER_TARGETS, rank=4, groups=2, trainable=TRAINABLE)
    before = {k: v.clone() for k, v in model.named_buffers() if "norm" in k}
    assert before and any(k.endswith("running_mean") for k in before)
    site = data.site_task("digits", 0, 2, 64, seed=0)[0]
    result = train_local(model, data.loader(site, 32, shuffle=True), epochs=2, lr=0.01, device=torch.device("cpu"))
    assert result.steps == 4
    after = dict(model.named_buffers())
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # Without the guard the same forward pass in training mode does move them.
    model.train()
    with torch.no_grad():
        model(data.preprocess(site.images[:8]))
    key = "base.features.norm0.running_mean"
    assert not torch.equal(dict(model.named_buffers())[key], before[key])


def test_only_norms_with_every_parameter_frozen_go_to_eval_mode():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.LayerNorm(4))
    for p in model[1].parameters():
        p.requires_grad_(False)
    model.train()
    assert freeze_frozen_norms(model) == ["1"]
    assert [m.training for m in model] == [True, False, True, True]


# --------------------------------------------------------------------------- the apps in process


@pytest.mark.parametrize("noise", [0.0, 1.0], ids=["plain", "dp-sgd"])
def test_client_and_server_apps_run_a_round_in_process(tmp_path, noise):
    """The real ServerApp main and ClientApp, on Flower messages, without a SuperLink (digits, 2 sites).

    With DP-SGD too: Opacus checks only trainable layers, and the frozen BatchNorms stay in eval mode.
    """
    results = tmp_path / "results.json"
    config = app_config(**{"dataset": "digits", "site-images": 120, "num-server-rounds": 1, "num-sites": 2,
                           "results-file": str(results), "local-epochs": 1, "dp-noise-multiplier": noise})
    grid = InProcessGrid(client_app.app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], config)
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    flower, level = logging.getLogger("flwr"), logging.getLogger("flwr").level
    flower.addHandler(handler)  # Flower's own logger (it does not propagate; other tests may quiet it)
    flower.setLevel(logging.INFO)
    try:
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    finally:
        flower.removeHandler(handler)
        flower.setLevel(level)
    # The console says what ran, dataset included.
    assert "fairlora-images: 2 sites, 1 round, strategy fairlora-exact, rank 4, dataset digits" in lines
    written = json.loads(results.read_text())
    assert written["strategy"] == "fairlora-exact" and written["group_names"] == list(data.GROUP_NAMES)
    assert [r["round"] for r in written["rounds"]] == [0, 1]
    last = written["rounds"][1]
    assert last["clients_train"]["agg-clients-kept"] == 2 and np.isfinite(last["central"]["worst_group_auc"])
    assert "fed-auc_g1" in last["clients_eval"]
    assert ("dp_epsilon" in last["clients_train"]) == (noise > 0)
    adapter = results.with_suffix(".adapter.safetensors")
    model = load_base_model()
    inject_adapters(model, ADAPTER_TARGETS, rank=4, groups=2, trainable=TRAINABLE)
    load_adapter(model, adapter)  # the saved adapter fits the app's model
    assert float(model.base.class_layers.out.lora_U.detach().abs().sum()) > 0


def test_a_site_without_partition_or_file_is_told_what_to_set():
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config=app_config())
    with pytest.raises(ValueError, match=r"lacks \['partition-id', 'num-partitions'\]"):
        client_app.site_data(context)
    context = Context(run_id=1, node_id=3, node_config={"data-path": "x.npz"}, state=RecordDict(), run_config=app_config())
    with pytest.raises(ValueError, match=r"needs dataset = 'medmnist'"):
        client_app.site_data(context)
    with pytest.raises(ValueError, match=r"dataset 'cifar' is not one of"):
        client_app.site_data(Context(1, 3, {"dataset": "cifar"}, RecordDict(), app_config()))


def test_central_evaluation_is_refused_for_site_files():
    with pytest.raises(ValueError, match="set central-evaluation = false"):
        server_app.central_test_images(app_config(dataset="medmnist"), 3)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@needs_fashion
def test_runner_runs_the_app_and_the_report_draws_it(tmp_path):
    sys.path.insert(0, str(ROOT / "simulations"))
    from run import superlink_healthy  # simulations/run.py, as test_simulation imports it

    assert not superlink_healthy(), "another SuperLink is serving the local ports"
    results = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "simulations" / "run.py"), "fairlora-images", "--supernodes", "3",
         "--run-config", f"num-server-rounds=2 site-images=800 results-file='{results}'"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished:completed" in proc.stdout and not superlink_healthy()
    written = json.loads(results.read_text())
    assert [r["round"] for r in written["rounds"]] == [0, 1, 2] and written["num_sites"] == 3
    assert written["rounds"][2]["central"]["auc"] > written["rounds"][0]["central"]["auc"]
    assert results.with_suffix(".adapter.safetensors").is_file()
    report = subprocess.run([sys.executable, "-m", "fedlowrank", "report", str(results), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (tmp_path / "report" / "report.md").is_file() and list((tmp_path / "report").glob("*.png"))
    assert data.GROUP_NAMES[1] in (tmp_path / "report" / "report.md").read_text()
