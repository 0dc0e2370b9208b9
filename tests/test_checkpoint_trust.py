"""Checkpoints an operator can trust: signed when a key is set, refused when from another run,
checked before anything is decompressed or allocated, every malformed field a named error."""

import hashlib
import io
import json
import os
import zipfile

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedlowrank.strategies import FedLowRank, LGreCo
from fedlowrank.strategies.checkpoint import KEY_ENV, CheckpointError, load_checkpoint, run
from fedlowrank.strategies.testing import InProcessGrid

from test_checkpoint import SITES, make

KEY = "an-operator-key-of-32-characters"

pytestmark = pytest.mark.usefixtures("task_identity")


def run_rounds(checkpoint_dir, rounds, strategy=None, resume_from=None, force_resume=False, app="demo"):
    import random

    random.seed(0)
    app_fn, default, initial = make("fedlowrank-carry")
    grid = InProcessGrid(app_fn, [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)],
                         {"checkpoint-dir": str(checkpoint_dir)})
    return run(strategy or default, grid, initial, rounds, train_config=ConfigRecord({"local-epochs": 1}),
               checkpoint_dir=checkpoint_dir, resume_from=resume_from, app=app, force_resume=force_resume)


def rewrite_manifest(folder):
    """What a forger does: change a file and recompute the SHA-256 manifest."""
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    for name in ("arrays.npz", "strategy.npz", "rng.npz", "meta.json"):
        manifest[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def checkpoint_with_meta(tmp_path, spoil):
    """One round's checkpoint whose meta.json ``spoil`` changed, the manifest recomputed to match."""
    run_rounds(tmp_path, 1)
    folder = tmp_path / "round-000001"
    meta = json.loads((folder / "meta.json").read_text())
    spoil(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    rewrite_manifest(folder)
    return folder


def forge_arrays(folder):
    with np.load(folder / "arrays.npz") as data:
        arrays = {k: data[k] for k in data.files}
    key = next(k for k in arrays if k.endswith("lora_U"))
    arrays[key] = arrays[key] + 1.0
    with open(folder / "arrays.npz", "wb") as out:
        np.savez(out, **arrays)
    rewrite_manifest(folder)


def test_a_forged_checkpoint_with_a_recomputed_manifest_is_refused_when_a_key_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    run_rounds(tmp_path, 2)
    assert load_checkpoint(tmp_path).server_round == 2  # signed, and the signature holds
    forge_arrays(tmp_path / "round-000002")
    with pytest.raises(CheckpointError, match="signature that does not match the key"):
        load_checkpoint(tmp_path)
    monkeypatch.delenv(KEY_ENV)
    assert load_checkpoint(tmp_path).server_round == 2  # without a key only corruption is detectable


def test_an_unsigned_checkpoint_is_refused_when_a_key_is_set_and_a_short_key_is_refused(tmp_path, monkeypatch):
    run_rounds(tmp_path, 1)
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(CheckpointError, match="is not signed"):
        load_checkpoint(tmp_path)
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(CheckpointError, match="at least 16"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("other", "named"),
    [
        (lambda: FedLowRank(fraction_evaluate=0.0, residual="drop"), "settings"),
        (lambda: FedLowRank(fraction_evaluate=0.0, residual="carry", rule="flexlora-dense"), "settings"),
        (lambda: LGreCo(FedLowRank(fraction_evaluate=0.0, residual="carry"), default="sq:3"), "strategy: checkpoint 'FedLowRank'"),
    ],
    ids=["residual", "rule", "compression-wrapper"],
)
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, other, named):
    run_rounds(tmp_path, 2)
    with pytest.raises(CheckpointError, match=f"from another run.*{named}.*force_resume=True"):
        run_rounds(tmp_path, 3, strategy=other(), resume_from=tmp_path)


def test_another_app_is_refused_and_force_resume_loads_it(tmp_path):
    run_rounds(tmp_path, 2)
    with pytest.raises(CheckpointError, match="app: checkpoint 'demo', this run 'other'"):
        run_rounds(tmp_path, 3, resume_from=tmp_path, app="other")
    result = run_rounds(tmp_path, 3, resume_from=tmp_path, app="other", force_resume=True)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]


def test_a_strategy_state_that_does_not_fit_is_a_named_error_even_when_forced(tmp_path):
    run_rounds(tmp_path, 1)
    wrapped = LGreCo(FedLowRank(fraction_evaluate=0.0, residual="carry"), default="sq:3")
    with pytest.raises(CheckpointError, match="strategy state does not fit LGreCo"):
        run_rounds(tmp_path, 2, strategy=wrapped, resume_from=tmp_path, force_resume=True)


def test_a_compressed_member_is_refused_before_it_is_decompressed(tmp_path):
    """A small member that would expand to 1 GiB: refused from the zip directory alone."""
    run_rounds(tmp_path, 1)
    folder = tmp_path / "round-000001"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**27,)})
    with zipfile.ZipFile(folder / "arrays.npz", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("fc.lora_U.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            zeros = bytes(2**24)
            for _ in range(2**30 // 2**24):
                member.write(zeros)
    assert (folder / "arrays.npz").stat().st_size < 2**22  # a few MiB on disk
    rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match="compressed; checkpoints are written uncompressed"):
        load_checkpoint(folder)


def test_a_member_declaring_a_terabyte_is_refused_before_allocation(tmp_path):
    run_rounds(tmp_path, 1)
    folder = tmp_path / "round-000001"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**37,)})
    with zipfile.ZipFile(folder / "rng.npz", "w") as archive:
        archive.writestr("torch.npy", header.getvalue() + b"\0" * 64)
    rewrite_manifest(folder)
    with pytest.raises(CheckpointError, match="declares shape"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda meta: meta.update(round="two"), "round is 'two', not a round number"),
        (lambda meta: meta.update(round=7), "says round 7 but the folder is round-000001"),
        (lambda meta: meta["rng"].update(python=[3, [1, 2], None]), "random states are malformed"),
    ],
    ids=["round-text", "round-moved", "rng"],
)
def test_every_malformed_field_is_a_named_checkpoint_error(tmp_path, spoil, message):
    folder = checkpoint_with_meta(tmp_path, spoil)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder).restore_rng()


def test_a_linked_or_misnamed_round_folder_is_not_a_resume_target(tmp_path):
    run_rounds(tmp_path / "run", 1)
    (tmp_path / "run" / "round-999999").symlink_to(tmp_path / "run" / "round-000001")
    with pytest.raises(CheckpointError, match="is a link"):
        load_checkpoint(tmp_path / "run")
    os.remove(tmp_path / "run" / "round-999999")
    (tmp_path / "run" / "round-00000x").mkdir()  # not a round folder: ignored
    assert load_checkpoint(tmp_path / "run").server_round == 1


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda meta: meta.update(fingerprint="x"), "fingerprint is malformed"),
        (lambda meta: meta.update(train_metrics_clientapp={"1": [1, 2]}), "train_metrics_clientapp is not a table"),
    ],
    ids=["fingerprint", "metrics"],
)
def test_a_malformed_fingerprint_or_metric_table_is_a_named_error_on_resume(tmp_path, spoil, message):
    checkpoint_with_meta(tmp_path, spoil)
    with pytest.raises(CheckpointError, match=message):
        run_rounds(tmp_path, 2, resume_from=tmp_path)
