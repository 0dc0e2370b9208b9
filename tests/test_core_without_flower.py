"""The core's server round runs several rounds on plain arrays without importing Flower."""

import re
import subprocess
import sys
from pathlib import Path

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def core_example() -> str:
    section = DESIGN.read_text().split("## The core without Flower", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_core_example_converges_without_importing_flower():
    code = core_example() + "\nimport sys\nassert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules), 'flwr imported'\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = re.findall(r"distance to the sites' weighted mean change ([0-9.]+) \(rank-4 floor ([0-9.]+)\)", out.stdout)
    gaps, floor = [float(g) for g, _ in found], float(found[0][1])
    assert len(gaps) == 8, out.stdout
    # Each round moves the global towards the sites' weighted mean change, down to what rank 4 can hold.
    assert all(b <= a + 1e-3 for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1.25 * floor < gaps[0], (gaps, floor)
