"""README's first command, then its plot command, on a fresh virtual environment."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# torch's CUDA build with the project: about 6.5 GB in a venv (measured), plus room for pip's unpacking.
VENV_BYTES_NEEDED = 8 * 2**30


def readme_first_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    return blocks[0].strip()


@pytest.mark.slow
def test_readme_first_command_and_the_report_work_on_a_fresh_venv(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    # A full disk fails pip deep inside an install; say so first, naming what is short.
    assert free >= VENV_BYTES_NEEDED, f"{tmp_path} has {free / 2**30:.1f} GiB free, a fresh torch venv needs 8 GiB"
    venv = tmp_path / "venv"
    try:
        _run_first_command_and_report(venv, tmp_path)
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def _run_first_command_and_report(venv: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    command = readme_first_command()
    assert command.startswith('pip install "torch==') and "simulations/run.py adult-married" in command
    # The main job as written, shortened to 2 rounds (the install steps run unchanged).
    command = command.replace("simulations/run.py adult-married", "simulations/run.py adult-married --run-config 'num-server-rounds=2'")
    # Only the venv on PATH; pip keeps this machine's own configuration (indexes, caps).
    env = {k: v for k, v in os.environ.items() if k.startswith(("PIP_", "XDG_", "FLWR_")) or k in ("HOME", "LANG")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 2/2: central AUC" in done.stdout
    written = re.search(r"results written to (\S+\.json)", done.stdout).group(1)
    plot = subprocess.run(["bash", "-c", f"fedlowrank report {written} --out {tmp_path / 'report'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert plot.returncode == 0, plot.stdout + plot.stderr
    assert plot.stdout.strip() == str(tmp_path / "report" / "report.md")
    assert (tmp_path / "report" / "auc_acc.png").stat().st_size > 10_000
    Path(written).unlink()
    Path(written).with_suffix(".adapter.safetensors").unlink()
