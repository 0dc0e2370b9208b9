"""Checkpoints after every round; a stopped run resumes to the same final model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from torch import nn

from fedlowrank.adapters import exchange_state, inject_adapters
from fedlowrank.clients import AdapterConfig, ClientData, build_client_app, to_record
from fedlowrank.strategies import FairLoRA, FedLowRank, LGreCo
from fedlowrank.strategies.checkpoint import CheckpointError, load_checkpoint, run
from fedlowrank.strategies.testing import InProcessGrid

SITES, ROUNDS = 3, 4


def base_model(context=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 1))


def site_data(partition):
    gen = torch.Generator().manual_seed(300 + partition)
    x = torch.randn(128, 8, generator=gen)
    g = (x[:, 0] > 0).long()
    y = torch.where(g == 1, x[:, 1] > 0, x[:, 2] > 0).long()
    return ClientData([(x[i : i + 32], y[i : i + 32], g[i : i + 32]) for i in range(0, 128, 32)], [(x, y, g)], 2)


def make(kind):
    groups = 2 if kind == "lgreco-fairlora" else 1
    adapter = AdapterConfig(target_modules=r"^0$", rank=2, groups=groups, trainable=r"^2\..*")
    app = build_client_app(base_model, lambda ctx: site_data(int(ctx.node_config["partition-id"])), adapter, lr=0.02)
    model = base_model()
    inject_adapters(model, adapter.target_modules, rank=2, groups=groups, trainable=adapter.trainable)
    if kind == "lgreco-fairlora":
        strategy = LGreCo(FairLoRA(fraction_evaluate=0.0), default="sq:3", reallocate_every=2, max_interval_factor=1)
    else:
        strategy = FedLowRank(fraction_evaluate=0.0, residual="carry")  # 3 clients x rank 2 > rank 2: carried
    return app, strategy, to_record(exchange_state(model))


def run_in_process(kind, rounds, checkpoint_dir, resume_from=None):
    import random

    random.seed(0)  # Flower samples nodes with Python's random
    app, strategy, initial = make(kind)
    grid = InProcessGrid(app, [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)],
                         {"checkpoint-dir": str(checkpoint_dir)})
    return run(strategy, grid, initial, rounds, train_config=ConfigRecord({"local-epochs": 1}),
               checkpoint_dir=checkpoint_dir, resume_from=resume_from)


@pytest.mark.parametrize("kind", ["fedlowrank-carry", "lgreco-fairlora"])
def test_stopped_and_resumed_run_ends_with_the_same_arrays(tmp_path, kind):
    whole = run_in_process(kind, ROUNDS, tmp_path / "whole")
    run_in_process(kind, 2, tmp_path / "stopped")  # stops after round 2 of 4
    # A fresh process would start with fresh clients: new grid, new contexts, new strategy.
    resumed = run_in_process(kind, ROUNDS, tmp_path / "stopped", resume_from=tmp_path / "stopped")
    for key in whole.arrays.keys():
        np.testing.assert_array_equal(resumed.arrays[key].numpy(), whole.arrays[key].numpy(), err_msg=key)
    assert sorted(resumed.train_metrics_clientapp) == [1, 2, 3, 4]  # metrics of rounds 1-2 restored
    if kind == "lgreco-fairlora":  # the clients' error feedback came back from their own files
        assert (tmp_path / "stopped" / "clients" / "0" / "round-000004.npz").exists()


def test_a_tampered_or_truncated_checkpoint_is_refused_and_the_previous_still_loads(tmp_path):
    run_in_process("fedlowrank-carry", 3, tmp_path)
    newest = load_checkpoint(tmp_path)
    assert newest.server_round == 3 and "strategy.npz" in os.listdir(newest.path)
    arrays = newest.path / "arrays.npz"
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="arrays.npz does not match its checksum.*previous checkpoint is .*round-000002"):
        load_checkpoint(tmp_path)
    (tmp_path / "round-000002" / "strategy.npz").write_bytes(b"")  # truncated
    with pytest.raises(CheckpointError, match="strategy.npz does not match"):
        load_checkpoint(tmp_path / "round-000002")
    assert load_checkpoint(tmp_path / "round-000001").server_round == 1


def test_checkpoint_holds_no_pickle_and_the_strategy_state_round_trips(tmp_path):
    run_in_process("lgreco-fairlora", 2, tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    assert all(v.dtype != object for v in checkpoint.strategy_state.values())
    _, strategy, _ = make("lgreco-fairlora")
    strategy.load_state_dict(checkpoint.strategy_state)
    assert strategy.state_dict().keys() == checkpoint.strategy_state.keys()
    assert strategy.strategy.state.group_shares is not None and strategy.allocation_history
    meta = json.loads((checkpoint.path / "meta.json").read_text())
    assert meta["round"] == 2 and set(meta["train_metrics_clientapp"]) == {"1", "2"}


# --------------------------------------------------------------------------- through flwr run

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "simulations" / "run.py"
CONFIGS = {
    "fedlowrank": "strategy='fedlowrank'",
    "lgreco-fairlora": "strategy='fairlora-exact' groups=2 compression='lgreco' compression-reallocate-every=2",
}


def flwr_run(tmp_path, config, wait=True):
    command = [sys.executable, str(RUNNER), "adult-married", "--supernodes", "3", "--run-config", config]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_flwr_run_killed_after_round_three_resumes_to_the_same_arrays(tmp_path, kind):
    """SIGKILL the running ServerApp (flwr-simulation) once round 3's checkpoint is written."""
    base = CONFIGS[kind]
    whole = flwr_run(tmp_path, f"num-server-rounds=6 {base} checkpoint-dir='{tmp_path / 'A'}' results-file='{tmp_path / 'a.json'}'")
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]
    killed = tmp_path / "B"
    proc = flwr_run(tmp_path, f"num-server-rounds=6 {base} checkpoint-dir='{killed}' results-file='{tmp_path / 'b.json'}'", wait=False)
    deadline = time.monotonic() + 300
    while not (killed / "round-000003").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    pids = subprocess.run(["pgrep", "-f", "flwr-simulation"], capture_output=True, text=True).stdout.split()
    assert pids, "no running ServerApp to kill"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "finished:failed" in out, out[-2000:]
    results_so_far = json.loads((tmp_path / "b.json").read_text())["rounds"]
    assert len(results_so_far) >= 4  # rounds 0-3 were written as they finished
    resumed = flwr_run(tmp_path, f"num-server-rounds=6 {base} checkpoint-dir='{killed}' resume-from='{killed}' results-file='{tmp_path / 'b.json'}'")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / "A").arrays
    b = load_checkpoint(killed).arrays
    for key in a.keys():
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=1e-6, atol=1e-7, err_msg=key)
