"""The main job with secure aggregation, through flwr run: the same model as the plain run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "simulations" / "run.py"


def run_app(tmp_path, name, extra):
    results = tmp_path / f"{name}.json"
    command = [sys.executable, str(RUNNER), "adult-married", "--run-config",
               f"num-server-rounds=3 results-file='{results}' {extra}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "FLWR_HOME": str(tmp_path / f"home-{name}")})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads(results.read_text())["rounds"], done.stdout


@pytest.mark.slow
def test_secure_adult_run_gives_the_plain_runs_model(tmp_path):
    # robust='' so that the plain run aggregates what the secure one does (no per-reply clip to compare).
    plain, _ = run_app(tmp_path, "plain", "robust=''")
    secure, out = run_app(tmp_path, "secure", "secure=true")
    assert "Secure aggregation (SecAgg+" in out
    for p, s in zip(plain[1:], secure[1:]):
        assert s["clients_train"]["agg-clients-kept"] == 5 and s["clients_train"]["agg-sketch-error-rel"] < 1e-6
        assert s["clients_train"]["secure-bytes-per-client"] > 0
        assert s["central"]["auc"] == pytest.approx(p["central"]["auc"], abs=1e-5)
        assert s["clients_train"]["train-loss"] == pytest.approx(p["clients_train"]["train-loss"], rel=1e-5)
