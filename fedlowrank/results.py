"""The results file of a run: written by the server body every round, read by ``fedlowrank report``.

One JSON object per run. Files written before a field existed still read (the field takes its
default); anything that is not a results file is refused naming the file and what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RoundRecord:
    """One round's figures (round 0: before training)."""

    round: int
    central: dict[str, Any] = field(default_factory=dict)
    """The server's evaluation on pooled test rows (simulation only)."""
    clients_eval: dict[str, Any] = field(default_factory=dict)
    """The sites' evaluate metrics, aggregated (``eval-*``; federation-wide ``fed-*``)."""
    clients_train: dict[str, Any] = field(default_factory=dict)
    """The sites' train metrics, aggregated, and the round's aggregation metrics (``agg-*``)."""


@dataclass
class RunResults:
    """Everything a run reports, round by round."""

    strategy: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    num_sites: int | None = None
    group_names: list[str] = field(default_factory=list)
    """Names of groups 0, 1, ... (the metrics' ``_g0``/``_g1`` suffixes)."""
    compression_allocations: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float | None = None
    rounds: list[RoundRecord] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def write(self, path: Path) -> None:
        """Atomically (a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path | str) -> RunResults:
        """The results file at ``path``.

        Raises
        ------
        ValueError
            Naming the file, if it is missing, not JSON, not an object, or has no rounds.
        """
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such results file") from None
        except OSError as err:  # a folder, no permission, ...
            raise ValueError(f"{path}: cannot read the results file ({err.strerror or err})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON results file ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a results file (a JSON object with 'rounds' was expected)")
        rounds = data.get("rounds")
        if not isinstance(rounds, list) or not rounds:
            raise ValueError(f"{path}: no rounds (a results file the ServerApp writes has one entry per round)")
        if not all(isinstance(r, dict) and isinstance(r.get("round"), int) for r in rounds):
            raise ValueError(f"{path}: every entry of 'rounds' must be an object with an integer 'round'")
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data and name != "rounds"}
        return cls(**known, rounds=[
            RoundRecord(r["round"], *(dict(r.get(k) or {}) for k in ("central", "clients_eval", "clients_train")))
            for r in rounds
        ])
