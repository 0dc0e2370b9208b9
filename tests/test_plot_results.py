"""simulations/plot_results.py draws a PNG from a results file written by the ServerApp."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "plot_results.py"


def test_plot_results_writes_a_png(tmp_path):
    rounds = [
        {"round": r, "central": {"auc": 0.7 + 0.01 * r, "auc_g0": 0.71, "auc_g1": 0.69, "dpd": 0.1, "eod": 0.2}}
        for r in range(4)
    ]
    results = tmp_path / "run.json"
    results.write_text(json.dumps({"strategy": "fedlowrank", "rounds": rounds}))
    out = tmp_path / "run.png"
    subprocess.run([sys.executable, str(SCRIPT), str(results), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
