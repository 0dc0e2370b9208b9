"""The apps follow Flower Hub's conventions: ``flwr build`` makes a valid FAB of each."""

import subprocess
import zipfile
from pathlib import Path

import pytest

SIMULATIONS = Path(__file__).resolve().parents[1] / "simulations"
# Each app's FAB must carry its code and the assets it loads at run time (a FAB takes only
# .py, .toml, .md, .yaml, .json, .jsonl and LICENSE: anything else would be missing).
APPS = {
    "adult-married": {"adult_married/server_app.py", "adult_married/client_app.py", "adult_married/assets/base_model.json"},
    "fairlora-images": {"fairlora_images/server_app.py", "fairlora_images/client_app.py", "fairlora_images/assets/base_densenet.json"},
}


@pytest.mark.parametrize("app", sorted(APPS))
def test_flwr_build_makes_a_fab_with_the_licence(tmp_path, app):
    done = subprocess.run(["flwr", "build", "--app", str(SIMULATIONS / app)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    fabs = list(tmp_path.glob("*.fab"))
    assert len(fabs) == 1 and fabs[0].name.startswith(f"fedlowrank.{app}.")
    names = set(zipfile.ZipFile(fabs[0]).namelist())
    assert {"LICENSE", "pyproject.toml"} | APPS[app] <= names
