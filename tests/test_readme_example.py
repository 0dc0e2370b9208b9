"""The README's "use FedLowRank in your own Flower app" blocks, as written, through the real Flower runtime."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(language: str) -> str:
    section = README.read_text().split("## Use FedLowRank in your own Flower app", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def readme_example() -> str:
    return readme_block("python")


def test_readme_app_runs_through_flwr_run(tmp_path):
    """quickstart.py and pyproject.toml from the README, run as it says: fedlowrank run FOLDER --supernodes 2."""
    app = tmp_path / "quickstart-app"
    app.mkdir()
    (app / "quickstart.py").write_text(readme_example())
    (app / "pyproject.toml").write_text(readme_block("toml"))
    assert "FedLowRank(" in readme_example()
    done = subprocess.run([sys.executable, "-m", "fedlowrank", "run", str(app), "--supernodes", "2"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished:completed" in done.stdout
    # Quiet: no Flower line that is untrue of a run the runner started, no app warnings.
    assert "Created default configuration" not in done.stdout and "changed from 10 to 2" not in done.stdout
    assert "Recommended property" not in done.stdout
    loss = float(re.search(r"final train loss ([0-9.eE+-]+)", done.stdout).group(1))
    # Three rounds of adapter training on a learnable task: far below chance-level loss (0.69).
    assert loss < 0.4


def readme_compression_block() -> str:
    section = README.read_text().split("**Compress what clients send (L-GreCo).**", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_client_under_lgreco(tmp_path, monkeypatch):
    """The quickstart client, unchanged, behind the README's LGreCo line: fewer bytes, still learns."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedlowrank.adapters import exchange_state
    from fedlowrank.strategies import FedLowRank, LGreCo
    from fedlowrank.strategies.testing import InProcessGrid

    module_file = tmp_path / "readme_quickstart_lgreco.py"
    module_file.write_text(readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    import readme_quickstart_lgreco as quick

    namespace = {"FedLowRank": FedLowRank}  # imported by the quickstart block above it
    exec(readme_compression_block(), namespace)  # noqa: S102
    strategy = namespace["strategy"]
    assert isinstance(strategy, LGreCo)
    grid = InProcessGrid(quick.client, [{"partition-id": i} for i in range(2)], {})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(exchange_state(quick.make_model())), num_rounds=3,
                            train_config=ConfigRecord({"lr": 0.01}))
    seen = result.train_metrics_clientapp[3]
    assert 0 < seen["lgreco-bytes"] < seen["lgreco-raw-bytes"]
    assert seen["train-loss"] < 0.4
    sys.modules.pop("readme_quickstart_lgreco", None)
