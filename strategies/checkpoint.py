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
import hmac
import io
import json
import os
import random
import re
import shutil
import time
import zipfile
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

from .replies import claimed_metrics, read_npy

PREFIX = "round-"
FILES = ("arrays.npz", "strategy.npz", "rng.npz", "meta.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


KEY_ENV, KEY_FILE_ENV = "FEDLOWRANK_CHECKPOINT_KEY", "FEDLOWRANK_CHECKPOINT_KEY_FILE"
"""The operator's checkpoint key: the key itself, or a file holding it."""

SIGNATURE = "hmac-sha256"


def checkpoint_key() -> bytes | None:
    """The operator's key from the environment (``FEDLOWRANK_CHECKPOINT_KEY``, or the file named by
    ``FEDLOWRANK_CHECKPOINT_KEY_FILE``); None if neither is set."""
    if os.environ.get(KEY_FILE_ENV):
        try:
            key = Path(os.environ[KEY_FILE_ENV]).read_bytes().strip()
        except OSError as err:
            raise CheckpointError(f"{KEY_FILE_ENV}={os.environ[KEY_FILE_ENV]} cannot be read ({err})") from None
    else:
        key = os.environ.get(KEY_ENV, "").encode()
    if key and len(key) < 16:
        raise CheckpointError(f"the checkpoint key is {len(key)} bytes; use at least 16 (e.g. `openssl rand -hex 32`)")
    return key or None


def _signature(files: dict[str, str], key: bytes) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def run_fingerprint(strategy: Strategy, arrays: ArrayRecord, app: str | None = None) -> dict:
    """What a checkpoint must share with the run that resumes it: the strategy (wrappers and
    the wrapped), its round settings, the global arrays' names, shapes and dtypes, the app."""
    chain, inner = [], strategy
    while inner is not None:
        chain.append(type(inner).__name__)
        inner = getattr(inner, "strategy", None)
        if not isinstance(inner, Strategy):
            inner = None
    config = getattr(_innermost(strategy), "config", None)
    settings = config.fingerprint() if hasattr(config, "fingerprint") else None
    shapes = {name: [list(a.shape), str(a.dtype)] for name, a in arrays.items() if not name.split(".")[-1].startswith("fold_")}
    return {"strategy": " > ".join(chain), "settings": settings, "arrays": shapes, "app": app}


def _innermost(strategy: Strategy) -> Strategy:
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy
    return strategy


def check_fingerprint(checkpoint: "Checkpoint", expected: dict) -> None:
    """Refuse a checkpoint of another run, naming what differs and how to resume anyway."""
    saved = checkpoint.meta.get("fingerprint")
    if saved is not None and (not isinstance(saved, dict) or not isinstance(saved.get("arrays", {}), dict)):
        raise CheckpointError(f"{checkpoint.path}: its run fingerprint is malformed ({type(saved).__name__})")
    if saved is None:
        raise CheckpointError(f"{checkpoint.path} has no run fingerprint (written by an older fedlowrank); "
                              "resume with force_resume=True (run config resume-force = true) to load it anyway")
    differs = [f"{field}: checkpoint {saved.get(field)!r}, this run {expected.get(field)!r}"
               for field in ("strategy", "settings", "app") if saved.get(field) != expected.get(field)]
    saved_arrays, arrays = saved.get("arrays") or {}, expected.get("arrays") or {}
    for name in sorted(set(saved_arrays) | set(arrays)):
        if saved_arrays.get(name) != arrays.get(name):
            differs.append(f"array {name}: checkpoint {saved_arrays.get(name)}, this run {arrays.get(name)}")
    if differs:
        raise CheckpointError(f"{checkpoint.path} is from another run ({'; '.join(differs[:4])}"
                              f"{'; ...' if len(differs) > 4 else ''}); resume with force_resume=True "
                              "(run config resume-force = true) to load it anyway")


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as out:
        np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})


def _load_npz(path: Path, data: bytes | None = None) -> dict[str, np.ndarray]:
    """An ``.npz`` we wrote, each member checked before anything is decompressed or allocated.

    :func:`save_checkpoint` stores members uncompressed, so a compressed one (a small file
    that could expand without bound) is refused, and so is a ``.npy`` header declaring more
    than its member holds.
    """
    data = path.read_bytes() if data is None else data
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            member = f"{path.name}:{info.filename}"
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise CheckpointError(f"{member} is compressed; checkpoints are written uncompressed (it could expand without bound)")
            if not info.filename.endswith(".npy") or info.file_size > len(data):
                raise CheckpointError(f"{member} is not an .npy array held in the file ({info.file_size} bytes declared)")
            try:
                out[info.filename[: -len(".npy")]] = read_npy(archive.read(info), member).copy()
            except ValueError as err:
                raise CheckpointError(str(err)) from None
    return out


def _metrics_json(history: dict[int, MetricRecord]) -> dict[str, dict]:
    return {str(r): dict(m) for r, m in history.items()}


def _metrics_from_json(data: dict[str, dict]) -> dict[int, MetricRecord]:
    return {int(r): MetricRecord(m) for r, m in data.items()}


def save_checkpoint(root: str | Path, server_round: int, arrays: ArrayRecord, strategy: Strategy, result: Result,
                    keep: int = 3, fingerprint: dict | None = None) -> Path:
    """Write round ``server_round``'s checkpoint under ``root`` atomically; keep the last ``keep``.

    ``fingerprint`` (:func:`run_fingerprint`; default that of ``strategy`` and ``arrays``) is
    what a resume must match. With an operator key in the environment (:func:`checkpoint_key`)
    the manifest is signed (HMAC-SHA256), so a modified checkpoint with a recomputed manifest
    is refused where the key is set.
    """
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
        "fingerprint": fingerprint or run_fingerprint(strategy, arrays),
        "rng": {"python": [python_state[0], list(python_state[1]), python_state[2]],
                "numpy": [numpy_state[0], *[float(x) if isinstance(x, float) else int(x) for x in numpy_state[2:]]]},
        "train_metrics_clientapp": _metrics_json(result.train_metrics_clientapp),
        "evaluate_metrics_clientapp": _metrics_json(result.evaluate_metrics_clientapp),
        "evaluate_metrics_serverapp": _metrics_json(result.evaluate_metrics_serverapp),
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    files = {name: _digest(tmp / name) for name in FILES}
    key = checkpoint_key()
    (tmp / "MANIFEST.json").write_text(json.dumps({**files, SIGNATURE: _signature(files, key)} if key else files))
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
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            version, state, gauss = self.meta["rng"]["python"]
            random.setstate((version, tuple(state), gauss))
            kind, pos, has_gauss, cached = self.meta["rng"]["numpy"]
            np.random.set_state((kind, self.rng["numpy_keys"], int(pos), int(has_gauss), float(cached)))
            torch.set_rng_state(torch.from_numpy(self.rng["torch"].copy()))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
            raise CheckpointError(f"{self.path}: the saved random states are malformed ({type(err).__name__}: {err})") from None


ROUND_FOLDER = re.compile(rf"^{PREFIX}\d{{6}}$")


def latest(root: str | Path) -> Path | None:
    """The newest ``round-NNNNNN`` folder under ``root`` (None if there is none); a link is refused."""
    rounds = sorted(p for p in Path(root).glob(f"{PREFIX}[0-9]*") if ROUND_FOLDER.match(p.name))
    if rounds and rounds[-1].is_symlink():
        raise CheckpointError(f"{rounds[-1]} is a link; a checkpoint round is a folder written by the run")
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
        if path.is_symlink() or not ROUND_FOLDER.match(path.name):
            raise CheckpointError(f"{path} is not a round folder written by a run ({PREFIX}NNNNNN, not a link)")
        manifest = json.loads((path / "MANIFEST.json").read_text())
        if not isinstance(manifest, dict):
            raise CheckpointError("MANIFEST.json is not a table of checksums")
        key = checkpoint_key()
        if key is not None:
            signature = manifest.get(SIGNATURE)
            files = {name: manifest.get(name) for name in FILES}
            if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(files, key)):
                what = "is not signed" if signature is None else "has a signature that does not match the key"
                raise CheckpointError(f"{path / 'MANIFEST.json'} {what} (a key is set in {KEY_ENV} or {KEY_FILE_ENV})")
        # Each file is read once: the bytes checked are the bytes parsed (no swap in between).
        data = {name: (path / name).read_bytes() for name in FILES}
        for name in FILES:
            if manifest.get(name) != hashlib.sha256(data[name]).hexdigest():
                raise CheckpointError(f"{path / name} does not match its checksum (truncated or modified)")
        meta = json.loads(data["meta.json"].decode())
        server_round = meta.get("round") if isinstance(meta, dict) else None
        if type(server_round) is not int or server_round < 0:
            raise CheckpointError(f"meta.json's round is {server_round!r}, not a round number")
        if path.name != f"{PREFIX}{server_round:06d}":
            raise CheckpointError(f"meta.json says round {server_round} but the folder is {path.name} (moved or stale)")
        arrays, state, rng = (_load_npz(path / name, data[name]) for name in ("arrays.npz", "strategy.npz", "rng.npz"))
        for table in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
            if not isinstance(meta.get(table, {}), dict) or not all(isinstance(m, dict) for m in meta.get(table, {}).values()):
                raise CheckpointError(f"meta.json's {table} is not a table of round metrics")
    except CheckpointError as err:
        raise CheckpointError(f"{err}; refusing {path}{_previous_hint(path)}") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err}){_previous_hint(path)}") from None
    record = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()})
    return Checkpoint(path, server_round, record, state, meta, rng)


def _previous_hint(path: Path) -> str:
    older = [p for p in sorted(path.parent.glob(f"{PREFIX}[0-9]*")) if ROUND_FOLDER.match(p.name) and p.name < path.name]
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
    app: str | None = None,
    force_resume: bool = False,
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
    app : str, optional
        The app's name, part of the run's fingerprint (:func:`run_fingerprint`).
    force_resume : bool (default: False)
        Resume from a checkpoint whose fingerprint (strategy, settings, array shapes, app)
        differs from this run's; refused otherwise, naming what differs.

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
    fingerprint = run_fingerprint(strategy, initial_arrays, app)
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from)
        if not force_resume:
            check_fingerprint(checkpoint, fingerprint)
        if hasattr(strategy, "load_state_dict"):
            try:
                strategy.load_state_dict(checkpoint.strategy_state)
            except (KeyError, ValueError, TypeError, IndexError) as err:
                raise CheckpointError(f"{checkpoint.path}: the strategy state does not fit {type(strategy).__name__} "
                                      f"({type(err).__name__}: {err})") from None
        elif checkpoint.strategy_state:
            raise CheckpointError(f"{type(strategy).__name__} cannot load the strategy state in {checkpoint.path}")
        checkpoint.restore_rng()
        try:
            result = checkpoint.result()
        except (ValueError, TypeError) as err:  # a metric Flower's MetricRecord refuses
            raise CheckpointError(f"{checkpoint.path}: its metrics cannot be restored ({err})") from None
        arrays, first = checkpoint.arrays, checkpoint.server_round + 1
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
    replies_seen = asked = idle = stopped = 0
    # A resumed run whose earlier rounds aggregated (or has no round left) has kept something.
    # (A round whose only figure is its silent sites kept nothing.)
    kept_any = first > num_rounds or any(set(m) - {"agg-clients-silent"} for m in result.train_metrics_clientapp.values())
    for current in range(first, num_rounds + 1):
        log(DEBUG, "[ROUND %s/%s]", current, num_rounds)
        if hasattr(strategy, "train_round"):  # a round of several exchanges (secure aggregation)
            new_arrays, metrics, sampled, replies = strategy.train_round(current, arrays, train_config, grid, timeout)
        else:
            messages = list(strategy.configure_train(current, arrays, train_config, grid))
            replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
            sampled = [m.metadata.dst_node_id for m in messages]
            new_arrays, metrics = strategy.aggregate_train(current, replies)
        silent = sorted(set(sampled) - {r.metadata.src_node_id for r in replies})
        if silent:
            log(WARNING, "Round %d: no reply within %g s from node(s) %s", current, timeout, ", ".join(map(str, silent)))
            # In the round's figures too, so the round line says the round went on without them.
            metrics = MetricRecord({**(metrics or {}), "agg-clients-silent": len(silent)})
        asked += len(sampled)
        replies_seen += len(replies)
        if not kept_any:  # the cause of a failed run; once a round kept a reply none is needed
            site_errors += [r.error.reason for r in replies if r.has_error()]
            claims = [claimed_metrics(r) for r in replies if not r.has_error()]
            idle += sum(1 for m in claims if m.get(getattr(strategy, "weighted_by_key", "num-examples")) == 0)
            stopped += sum(1 for m in claims if m.get("dp_stopped") == 1)
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
            saved = save_checkpoint(checkpoint_dir, current, arrays, strategy, result, fingerprint=fingerprint)
            log(DEBUG, "checkpoint written: %s", saved)
        if on_round:
            on_round(current, result)
    if not kept_any:
        raise RunFailed(failure_cause(site_errors, replies_seen, asked, timeout, idle, stopped))
    return result
