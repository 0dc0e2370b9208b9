"""The README's "use FedLowRank in your own Flower app" block runs in a real Flower simulation."""

import re
import sys
from pathlib import Path

from flwr.simulation import run_simulation

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Use FedLowRank in your own Flower app", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_with_fedlowrank(tmp_path, monkeypatch, capsys):
    module_file = tmp_path / "readme_quickstart.py"
    module_file.write_text(readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    import readme_quickstart

    assert "FedLowRank(" in readme_example()
    run_simulation(
        server_app=readme_quickstart.server,
        client_app=readme_quickstart.client,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    out = capsys.readouterr().out
    loss = float(re.search(r"final train loss ([0-9.eE+-]+)", out).group(1))
    # Three rounds of adapter training on a learnable task: far below chance-level loss (0.69).
    assert loss < 0.4
    sys.modules.pop("readme_quickstart", None)


def readme_compression_block() -> str:
    section = README.read_text().split("**Compress what clients send (L-GreCo).**", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_client_under_lgreco(tmp_path, monkeypatch):
    """The quickstart client, unchanged, behind the README's LGreCo line: fewer bytes, still learns."""
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp

    from fedlowrank.adapters import exchange_state
    from fedlowrank.strategies import FedLowRank, LGreCo

    module_file = tmp_path / "readme_quickstart_lgreco.py"
    module_file.write_text(readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    import readme_quickstart_lgreco as quick

    seen = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        namespace = {"FedLowRank": FedLowRank}  # imported by the quickstart block above it
        exec(readme_compression_block(), namespace)  # noqa: S102
        strategy = namespace["strategy"]
        assert isinstance(strategy, LGreCo)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(exchange_state(quick.make_model())),
            num_rounds=3,
            train_config=ConfigRecord({"lr": 0.01}),
        )
        seen.update(result.train_metrics_clientapp[3])

    run_simulation(server_app=server, client_app=quick.client, num_supernodes=2, backend_config={"client_resources": {"num_cpus": 1}})
    assert 0 < seen["lgreco-bytes"] < seen["lgreco-raw-bytes"]
    assert seen["train-loss"] < 0.4
    sys.modules.pop("readme_quickstart_lgreco", None)
