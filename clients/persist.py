"""Keep a node's ``Context.state`` on its own disk, so a resumed run picks it up.

``Context.state`` (L-GreCo's error feedback, the DP accountant) lives as long as the run.
When a run is stopped and resumed from a server checkpoint (a new run for Flower), each
node loads the state it saved after the last round the server completed, so the resumed
run continues exactly where the stopped one was.

Where: the node config's ``state-dir`` (deployment: a folder on the site's own disk), else
``<run config checkpoint-dir>/clients/<partition-id>`` (simulation, one machine). Files
are ``round-NNNNNN.npz`` (arrays) and ``.json`` (config and metric records), written
atomically; nothing is pickled.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedlowrank.runconfig import RunSettings

PREFIX = "round-"


def state_dir(context: Context) -> Path | None:
    """This node's folder for saved state, or None when the run keeps none."""
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"]))
    root = RunSettings.from_config(context.run_config).checkpoint_dir.strip()
    if not root:
        return None
    ident = context.node_config.get("partition-id", context.node_id)
    return Path(root) / "clients" / str(ident)


def save_state(folder: Path, server_round: int, state: RecordDict, keep: int = 3) -> None:
    """Write ``state`` as this node's state after ``server_round``."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays, records = {}, {"config": {}, "metrics": {}}
    for name, record in state.items():
        if isinstance(record, ArrayRecord):
            arrays.update({f"{name}/{k}": a.numpy() for k, a in record.items()})
        elif isinstance(record, ConfigRecord):
            records["config"][name] = dict(record)
        elif isinstance(record, MetricRecord):
            records["metrics"][name] = dict(record)
    stem = folder / f"{PREFIX}{server_round:06d}"
    for suffix, write in ((".json", lambda f: f.write(json.dumps(records).encode())),
                          (".npz", lambda f: np.savez(f, **arrays))):
        tmp = stem.with_suffix(suffix + ".tmp")
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, stem.with_suffix(suffix))
    for old in sorted(folder.glob(f"{PREFIX}*.json"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".npz").unlink(missing_ok=True)


def load_state(folder: Path, before_round: int) -> RecordDict | None:
    """The newest state saved after a round before ``before_round`` (None if there is none)."""
    saved = [p for p in sorted(folder.glob(f"{PREFIX}*.json")) if int(p.stem[len(PREFIX):]) < before_round]
    if not saved:
        return None
    stem = saved[-1].with_suffix("")
    records = json.loads(stem.with_suffix(".json").read_text())
    with np.load(io.BytesIO(stem.with_suffix(".npz").read_bytes()), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    state = RecordDict()
    for key, value in arrays.items():
        name, _, leaf = key.partition("/")
        if name not in state:
            state[name] = ArrayRecord()
        state[name][leaf] = Array(np.array(value, order="C"))
    for name, values in records["config"].items():
        state[name] = ConfigRecord(values)
    for name, values in records["metrics"].items():
        state[name] = MetricRecord(values)
    return state


def restore_state(context: Context, server_round: int) -> None:
    """At a node's first call in a run: fill an empty ``Context.state`` from disk, if saved."""
    folder = state_dir(context)
    if folder is None or len(context.state) > 0 or not folder.exists():
        return
    saved = load_state(folder, server_round)
    if saved is not None:
        for name, record in saved.items():
            context.state[name] = record


def persist_state(context: Context, server_round: int) -> None:
    """After training: save ``Context.state`` where :func:`state_dir` says (if anywhere)."""
    folder = state_dir(context)
    if folder is not None and len(context.state) > 0:
        save_state(folder, server_round, context.state)
