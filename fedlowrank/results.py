"""The results file of a run: written by the server body every round, read by ``fedlowrank report``.

One JSON object per run. Files written before a field existed still read (the field takes its
default); anything that is not a results file is refused naming the file and what is wrong.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class RunFailed(RuntimeError):
    """A run in which no round kept a valid reply; the message names the cause as the sites reported it."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"no round kept a valid reply: {cause}")
        self.cause = cause


EXTRA_OF_MODULE = {"opacus": "dp", "monai": "imaging", "einops": "imaging", "torchvision": "imaging", "sklearn": "imaging",
                   "matplotlib": "plot", "peft": "peft"}
"""The fedlowrank extra that installs a module a site may lack (``pyproject.toml``)."""

_FLOWER_REASON = re.compile(r"^<class '([^']+)'>:<'(.*)'>$", re.S)
"""Flower's error reason for a raising ClientApp: ``<class 'ModuleNotFoundError'>:<'No module named ...'>``
(in simulation the class is Ray's wrapper and the text its traceback)."""

TRACEBACK_LAST_LINE = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception|Exit|Interrupt)): (.+)$")
"""A traceback's last line: ``ModuleNotFoundError: No module named 'opacus'``."""

_WRAPPERS = {"ClientAppException", "RayTaskError"}
"""Exceptions that only wrap the site's own (Flower's ClientApp runner, Ray's actors)."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def readable_reason(reason: str) -> str:
    """A site's error as a person reads it (``ModuleNotFoundError: No module named 'opacus'``),
    one line, with the extra to install where a module is missing."""
    text = _ANSI.sub("", reason).strip()
    found = _FLOWER_REASON.match(text)
    kind, body = (found.group(1).rsplit(".", 1)[-1], found.group(2)) if found else (None, text)
    # The first exception a traceback names that is not a wrapper is the site's own (chained ones follow).
    raised = [m for m in map(TRACEBACK_LAST_LINE.match, (line.strip() for line in body.splitlines())) if m and m.group(1) not in _WRAPPERS]
    if raised:
        text = f"{raised[0].group(1)}: {raised[0].group(2)}"
    elif kind:
        text = f"{kind}: {body}"
    text = " ".join(text.split())
    missing = re.search(r"No module named '(\w+)", text)
    if missing and missing.group(1) in EXTRA_OF_MODULE:
        extra = EXTRA_OF_MODULE[missing.group(1)]
        text += f"; install the [{extra}] extra (pip install 'fedlowrank[{extra}]')"
    return text[:500]


def failure_cause(site_errors: list[str], replies: int, asked: int, timeout: float, idle: int = 0, stopped: int = 0) -> str:
    """Why a run's rounds kept nothing: ``site_errors`` (the errors the sites sent), out of
    ``replies`` received for ``asked`` requests over the run's rounds; ``idle`` of the replies
    trained on no examples, ``stopped`` of those because their DP budget was spent (``dp_stopped``)."""
    if replies == 0:
        return f"no site replied within round-timeout = {timeout:g} s ({asked} requests)"
    if idle and idle == replies - len(site_errors):
        if stopped == idle:
            return (f"every site stopped training: its DP budget would be exceeded ({stopped} replies with dp_stopped = 1; "
                    "raise dp-target-epsilon or dp-noise-multiplier, or train fewer rounds)")
        return f"every site that replied trained on no examples ({idle} replies with num-examples = 0)"
    if site_errors:
        reason, count = Counter(readable_reason(r) for r in site_errors).most_common(1)[0]
        if len(site_errors) == replies:
            return f"every site failed: {reason}" + (f" ({count} of {replies} replies)" if count < replies else "")
        return (f"{len(site_errors)} of {replies} replies were errors ({reason}); the strategy rejected the rest "
                "(its 'Dropping reply' lines name each node and why)")
    return f"the strategy rejected all {replies} replies (its 'Dropping reply' lines name each node and why)"


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
    app: str | None = None
    """The Flower app that ran (``adult-married``); reports group runs by it."""
    run_config: dict[str, Any] = field(default_factory=dict)
    num_sites: int | None = None
    group_names: list[str] = field(default_factory=list)
    """Names of groups 0, 1, ... (the metrics' ``_g0``/``_g1`` suffixes)."""
    compression_allocations: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float | None = None
    failure: str | None = None
    """Why the run failed (:class:`RunFailed`), or None: its rounds then kept no valid reply."""
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
