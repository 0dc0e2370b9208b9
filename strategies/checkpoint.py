"""Checkpoint a run after every round, and resume it.

A checkpoint is a folder ``<root>/round-000003`` holding

- ``arrays.npz``: the global arrays after that round;
- ``strategy.npz``: the strategy's ``state_dict()`` (wrappers nest their inner strategy's);
- ``rng.npz`` and ``meta.json``: the round, the Python/NumPy/torch random states (Flower
  samples nodes with Python's ``random``), the metrics so far;
- ``MANIFEST.json``: the SHA-256 of each file.

It is written into a temporary folder and renamed into place (atomic on one file
system), and nothing is pickled: ``.npz`` files are read with ``allow_pickle=False``.
Loading verifies every checksum first; a truncated or tampered checkpoint is refused
with an error naming the file, and the previous round's folder still loads.

:func:`run` is Flower's ``Strategy.start`` loop with a checkpoint after each round and a
``resume_from`` that continues from one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import DEBUG, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedlowrank.results import RunFailed, failure_cause

PREFIX = "round-"
FILES = ("arrays.npz", "strategy.npz", "rng.npz", "meta.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as out:
        np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _metrics_json(history: dict[int, MetricRecord]) -> dict[str, dict]:
    return {str(r): dict(m) for r, m in history.items()}


def _metrics_from_json(data: dict[str, dict]) -> dict[int, MetricRecord]:
    return {int(r): MetricRecord(m) for r, m in data.items()}


def save_checkpoint(root: str | Path, server_round: int, arrays: ArrayRecord, strategy: Strategy, result: Result,
                    keep: int = 3) -> Path:
    """Write round ``server_round``'s checkpoint under ``root`` atomically; keep the last ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{server_round:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_npz(tmp / "arrays.npz", {k: a.numpy() for k, a in arrays.items()})
    state = strategy.state_dict() if hasattr(strategy, "state_dict") else {}
    _save_npz(tmp / "strategy.npz", state)
    numpy_state = np.random.get_state()
    _save_npz(tmp / "rng.npz", {"numpy_keys": numpy_state[1], "torch": torch.get_rng_state().numpy()})
    python_state = random.getstate()
    meta = {
        "round": server_round,
        "time": time.time(),
        "strategy": type(strategy).__name__,
        "rng": {"python": [python_state[0], list(python_state[1]), python_state[2]],
                "numpy": [numpy_state[0], *[float(x) if isinstance(x, float) else int(x) for x in numpy_state[2:]]]},
        "train_metrics_clientapp": _metrics_json(result.train_metrics_clientapp),
        "evaluate_metrics_clientapp": _metrics_json(result.evaluate_metrics_clientapp),
        "evaluate_metrics_serverapp": _metrics_json(result.evaluate_metrics_serverapp),
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    (tmp / "MANIFEST.json").write_text(json.dumps({name: _digest(tmp / name) for name in FILES}))
    for handle in (tmp / name for name in (*FILES, "MANIFEST.json")):
        with open(handle, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    """A verified checkpoint, as :func:`load_checkpoint` returns it."""

    path: Path
    server_round: int
    arrays: ArrayRecord
    strategy_state: dict[str, np.ndarray]
    meta: dict
    rng: dict[str, np.ndarray]

    def result(self) -> Result:
        """The metrics so far, as Flower's ``Result``."""
        result = Result()
        result.arrays = self.arrays
        result.train_metrics_clientapp = _metrics_from_json(self.meta["train_metrics_clientapp"])
        result.evaluate_metrics_clientapp = _metrics_from_json(self.meta["evaluate_metrics_clientapp"])
        result.evaluate_metrics_serverapp = _metrics_from_json(self.meta["evaluate_metrics_serverapp"])
        return result

    def restore_rng(self) -> None:
        """Put the Python, NumPy and torch random states back as they were after that round."""
        version, state, gauss = self.meta["rng"]["python"]
        random.setstate((version, tuple(state), gauss))
        kind, pos, has_gauss, cached = self.meta["rng"]["numpy"]
        np.random.set_state((kind, self.rng["numpy_keys"], int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(torch.from_numpy(self.rng["torch"].copy()))


def latest(root: str | Path) -> Path | None:
    """The newest ``round-*`` folder under ``root`` (None if there is none)."""
    rounds = sorted(Path(root).glob(f"{PREFIX}[0-9]*"))
    return rounds[-1] if rounds else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint: a ``round-*`` folder, or a root (its newest round).

    Raises
    ------
    CheckpointError
        If there is none, a file is missing, or a checksum does not match (naming the
        file and, for a root, the previous round to resume from instead).
    """
    path = Path(path)
    if not path.name.startswith(PREFIX):
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint ({PREFIX}NNNNNN folder) under {path}")
        path = found
    try:
        manifest = json.loads((path / "MANIFEST.json").read_text())
        for name in FILES:
            if manifest.get(name) != _digest(path / name):
                raise CheckpointError(f"{path / name} does not match its checksum (truncated or modified)")
        meta = json.loads((path / "meta.json").read_text())
        arrays = _load_npz(path / "arrays.npz")
        state = _load_npz(path / "strategy.npz")
        rng = _load_npz(path / "rng.npz")
    except CheckpointError as err:
        raise CheckpointError(f"{err}; refusing {path}{_previous_hint(path)}") from None
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err}){_previous_hint(path)}") from None
    record = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()})
    return Checkpoint(path, int(meta["round"]), record, state, meta, rng)


def _previous_hint(path: Path) -> str:
    older = [p for p in sorted(path.parent.glob(f"{PREFIX}[0-9]*")) if p.name < path.name]
    return f"; the previous checkpoint is {older[-1]}" if older else ""


def run(
    strategy: Strategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float = 3600,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    on_round: Callable[[int, Result], None] | None = None,
) -> Result:
    """Flower's ``Strategy.start`` loop, checkpointed after every round and resumable.

    Parameters
    ----------
    strategy, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        As :meth:`flwr.serverapp.strategy.Strategy.start`. ``timeout`` bounds each round's
        wait for replies: a site that hangs costs at most that.
    checkpoint_dir : path, optional
        Write a checkpoint there after every round (:func:`save_checkpoint`).
    resume_from : path, optional
        Continue from a checkpoint (a root or a ``round-*`` folder): global arrays,
        strategy state, random states and metrics are restored, and the run goes on
        with the next round up to ``num_rounds``. ``initial_arrays`` is then unused.
    on_round : callable, optional
        ``(server_round, result)`` after every round (and round 0), e.g. to write results.

    Raises
    ------
    RunFailed
        After the last round, if no round kept a valid reply (the global model never
        moved): the message names the cause as the sites reported it (the most common
        error, with the extra to install for a missing module), or the timeout. A node
        that does not reply within ``timeout`` is named in that round's log.
    """
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    strategy.summary()
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from)
        if hasattr(strategy, "load_state_dict"):
            strategy.load_state_dict(checkpoint.strategy_state)
        elif checkpoint.strategy_state:
            raise CheckpointError(f"{type(strategy).__name__} cannot load the strategy state in {checkpoint.path}")
        checkpoint.restore_rng()
        result, arrays, first = checkpoint.result(), checkpoint.arrays, checkpoint.server_round + 1
        log(INFO, "Resuming from %s: round %d of %d next", checkpoint.path, first, num_rounds)
    else:
        result, arrays, first = Result(), initial_arrays, 1
        result.arrays = arrays
        if evaluate_fn:
            res = evaluate_fn(0, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        if on_round:
            on_round(0, result)
    site_errors: list[str] = []
    replies_seen = asked = 0
    # A resumed run whose earlier rounds aggregated (or has no round left) has kept something.
    kept_any = first > num_rounds or bool(result.train_metrics_clientapp)
    for current in range(first, num_rounds + 1):
        log(DEBUG, "[ROUND %s/%s]", current, num_rounds)
        messages = list(strategy.configure_train(current, arrays, train_config, grid))
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        silent = sorted({m.metadata.dst_node_id for m in messages} - {r.metadata.src_node_id for r in replies})
        if silent:
            log(WARNING, "Round %d: no reply within %g s from node(s) %s", current, timeout, ", ".join(map(str, silent)))
        asked += len(messages)
        replies_seen += len(replies)
        site_errors += [r.error.reason for r in replies if r.has_error()]
        new_arrays, metrics = strategy.aggregate_train(current, replies)
        if new_arrays is not None:
            result.arrays = arrays = new_arrays
            kept_any = True
        else:
            log(WARNING, "Round %d: no aggregate; the global model is kept", current)
        if metrics is not None:
            result.train_metrics_clientapp[current] = metrics
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(current, arrays, evaluate_config, grid), timeout=timeout
        )
        evaluated = strategy.aggregate_evaluate(current, replies)
        if evaluated is not None:
            result.evaluate_metrics_clientapp[current] = evaluated
        if evaluate_fn:
            res = evaluate_fn(current, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[current] = res
        if checkpoint_dir is not None:
            saved = save_checkpoint(checkpoint_dir, current, arrays, strategy, result)
            log(DEBUG, "checkpoint written: %s", saved)
        if on_round:
            on_round(current, result)
    if not kept_any:
        raise RunFailed(failure_cause(site_errors, replies_seen, asked, timeout))
    return result
