"""A regular (non-editable) install ships every module under the names an editable one uses."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"fedlowrank": "fedlowrank", "strategies": "fedlowrank/strategies", "clients": "fedlowrank/clients"}


def test_wheel_contains_core_strategies_and_clients(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("fedlowrank-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{target}/{path.relative_to(ROOT / source).as_posix()}"
        for source, target in MAPPING.items()
        for path in (ROOT / source).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected <= shipped, sorted(expected - shipped)
