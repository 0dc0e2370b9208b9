"""The default app on Flower's Deployment Engine over loopback: a SuperLink and 3 SuperNodes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "simulations" / "run.py"
APP = ROOT / "simulations" / "adult-married"


def flower_processes() -> list[str]:
    """Deployment processes: SuperNodes, and anything on the loopback deployment's port."""
    found = subprocess.run(["pgrep", "-af", "flower-supernode|flower-superlink|flwr-serverapp|flwr-clientapp"],
                           capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line and ("39191" in line or "supernode" in line)]


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-node-auth-and-secure-aggregation"])
def test_loopback_deployment_runs_saves_and_stops_every_process(tmp_path, secure):
    assert not flower_processes(), "Flower processes already running"
    home = tmp_path / "flwr-home"  # ours, so the runner keeps the logs for this test to read
    results = tmp_path / "results.json"
    command = [sys.executable, str(RUNNER), "adult-married", "--deployment", "3",
               "--run-config", f"num-server-rounds=3 results-file='{results}' central-evaluation=true"]  # loopback: the sites' own rows
    if secure:  # TLS, SuperNode auth and secure aggregation: the server learns only sums (docs/secure.md)
        command += ["--secure", "--unregistered", "1"]
        command[command.index("--run-config") + 1] += " secure=true"
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**__import__("os").environ, "FLWR_HOME": str(home)})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "finished:completed" in out
    assert not flower_processes(), flower_processes()
    rounds = json.loads(results.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["clients_train"]["agg-clients-kept"] == 3 for r in rounds[1:])
    if secure:
        # Four SuperNodes started, three registered: three sites train (num-sites = 3 holds).
        assert "TLS + SuperNode auth" in out and "sites 3 kept, 0 dropped" in out
        assert all(r["clients_train"]["agg-sketch-error-rel"] < 1e-6 and r["clients_train"]["secure-clipped"] == 0 for r in rounds[1:])
        # The fourth SuperNode's key was never registered: the SuperLink does not let it in.
        refused = (home / "deployment" / "supernode-3.log").read_text()
        assert "Failed to activate SuperNode" in refused, refused[-2000:]
        for registered in range(3):
            assert "Failed to activate" not in (home / "deployment" / f"supernode-{registered}.log").read_text()
    # The saved final adapter reproduces the last round's central AUC in a fresh model.
    sys.path.insert(0, str(APP))
    try:
        from adult_married.data import loader, pooled_test_rows
        from adult_married.server_app import global_model

        from fedlowrank.adapters import load_adapter
        from fedlowrank.clients import predict
        from fedlowrank.fairness import group_fairness_report

        model = global_model(4)
        meta = load_adapter(model, results.with_suffix(".adapter.safetensors"))
        assert meta["rank"] == 4
        pred = predict(model, loader(pooled_test_rows(3, 0), 2048, shuffle=False), torch.device("cpu"))
        auc = group_fairness_report(pred.labels, pred.scores, pred.groups, num_groups=2)["auc"]
        assert auc == pytest.approx(rounds[-1]["central"]["auc"], abs=1e-6)
    finally:
        sys.path.remove(str(APP))
