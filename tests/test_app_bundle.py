"""The app follows Flower Hub's conventions: ``flwr build`` makes a valid FAB of it."""

import subprocess
import zipfile
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "simulations" / "adult-married"


def test_flwr_build_makes_a_fab_with_the_licence(tmp_path):
    done = subprocess.run(["flwr", "build", "--app", str(APP)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    fabs = list(tmp_path.glob("*.fab"))
    assert len(fabs) == 1 and fabs[0].name.startswith("fedlowrank.adult-married.")
    names = set(zipfile.ZipFile(fabs[0]).namelist())
    assert {"LICENSE", "pyproject.toml", "adult_married/server_app.py", "adult_married/client_app.py"} <= names
