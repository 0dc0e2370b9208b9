"""MedMNIST and FairFedMed loaders on small files written in the real schemas."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys

import numpy as np
import pytest

from fedlowrank.datasets import FairFedMedSet, ImageSet, fairfedmed_sites, load_fairfedmed, load_medmnist

# --------------------------------------------------------------------------- MedMNIST


def write_medmnist(path, image_shape, labels_per_split=None, n=(5, 3, 4), seed=0, drop=()):
    """A MedMNIST-style npz: {split}_images uint8, {split}_labels (N, 1) or (N, K) uint8."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *image_shape), dtype=np.uint8)
        label_shape = (count, 1) if labels_per_split is None else (count, labels_per_split)
        high = 9 if labels_per_split is None else 2
        arrays[f"{split}_labels"] = rng.integers(0, high, label_shape, dtype=np.uint8)
    for key in drop:
        del arrays[key]
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_grey_2d_gets_one_channel_and_unit_scale(tmp_path):
    path = tmp_path / "organamnist.npz"
    raw = write_medmnist(path, (28, 28))
    data = load_medmnist(path, "val")
    assert isinstance(data, ImageSet)
    assert data.images.shape == (3, 1, 28, 28) and data.images.dtype == np.float32
    np.testing.assert_allclose(data.images[:, 0], raw["val_images"] / 255.0, rtol=1e-6)
    assert data.labels.shape == (3,) and data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, raw["val_labels"][:, 0])
    assert data.groups.dtype == np.int64 and (data.groups == -1).all()
    assert data.group_names == () and len(data) == 3


def test_medmnist_rgb_moves_channels_first(tmp_path):
    path = tmp_path / "pathmnist.npz"
    raw = write_medmnist(path, (8, 6, 3))
    data = load_medmnist(path, "test")
    assert data.images.shape == (4, 3, 8, 6)
    # Channel c of sample i is the stored [..., c] plane, not a reshaped scramble.
    np.testing.assert_allclose(data.images[2, 1], raw["test_images"][2, :, :, 1] / 255.0, rtol=1e-6)
    assert data.images.flags["C_CONTIGUOUS"]


def test_medmnist_3d_volume_gets_channel_axis(tmp_path):
    path = tmp_path / "organmnist3d.npz"
    raw = write_medmnist(path, (7, 6, 5))
    data = load_medmnist(path)
    assert data.images.shape == (5, 1, 7, 6, 5)
    np.testing.assert_allclose(data.images[4, 0], raw["train_images"][4] / 255.0, rtol=1e-6)
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0


def test_medmnist_multilabel_keeps_label_matrix(tmp_path):
    path = tmp_path / "chestmnist.npz"
    raw = write_medmnist(path, (28, 28), labels_per_split=14)
    data = load_medmnist(path, "train")
    assert data.labels.shape == (5, 14) and data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, raw["train_labels"])


def test_medmnist_unknown_split_names_the_split_and_file(tmp_path):
    path = tmp_path / "bloodmnist.npz"
    write_medmnist(path, (28, 28, 3))
    with pytest.raises(ValueError, match=r"'validation'.*bloodmnist\.npz.*\('train', 'val', 'test'\)"):
        load_medmnist(path, "validation")


def test_medmnist_missing_key_names_key_and_file(tmp_path):
    path = tmp_path / "dermamnist.npz"
    write_medmnist(path, (28, 28, 3), drop=("test_labels",))
    load_medmnist(path, "train")  # the other splits are still readable
    with pytest.raises(ValueError, match=r"dermamnist\.npz has no key 'test_labels'"):
        load_medmnist(path, "test")


def test_medmnist_missing_file_and_bad_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_medmnist(tmp_path / "nope.npz")
    path = tmp_path / "flat.npz"
    np.savez(path, train_images=np.zeros((4, 10), np.uint8), train_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(ValueError, match=r"flat\.npz\[train_images\].*got \(4, 10\)"):
        load_medmnist(path)
    np.savez(path, train_images=np.zeros((4, 5, 5), np.uint8), train_labels=np.zeros((3, 1), np.uint8))
    with pytest.raises(ValueError, match="4 train_images but 3 train_labels"):
        load_medmnist(path)


def test_medmnist_caller_groups_are_validated(tmp_path):
    path = tmp_path / "retinamnist.npz"
    write_medmnist(path, (28, 28, 3))
    data = load_medmnist(path, "val", groups=[0, -1, 1], group_names=("a", "b"))
    np.testing.assert_array_equal(data.groups, [0, -1, 1])
    assert data.group_names == ("a", "b")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        load_medmnist(path, "val", groups=[0, 1])
    with pytest.raises(ValueError, match="must be integers"):
        load_medmnist(path, "val", groups=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=">= -1"):
        load_medmnist(path, "val", groups=[0, -2, 1])
    with pytest.raises(ValueError, match="has no name"):
        load_medmnist(path, "val", groups=[0, 2, 1], group_names=("a", "b"))


def test_imageset_rejects_inconsistent_lengths_and_dtypes():
    images = np.zeros((3, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="inconsistent lengths: 3 images, 2 labels"):
        ImageSet(images, np.zeros(2, np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="images must be a numpy array of float32"):
        ImageSet(images.astype(np.float64), np.zeros(3, np.int64), np.zeros(3, np.int64))
    data = ImageSet(images, np.zeros(3, np.int64), np.zeros(3, np.int64))
    with pytest.raises(AttributeError):
        data.labels = np.ones(3, np.int64)  # frozen


# -------------------------------------------------------------------------- FairFedMed

SLO = (6, 5)  # small stand-in for the 224 x 224 SLO fundus


def write_patient(all_dir, name, race, glaucoma, *, language=0, slo=True, oct_depth=0, seed=0):
    """One per-patient npz with the FairFedMed/FairVLMed keys and 0-d demographics."""
    rng = np.random.default_rng(seed)
    arrays = {
        "glaucoma": np.array(glaucoma, dtype=np.int64),
        "race": np.array(race, dtype=np.int64),
        "gender": np.array(seed % 2, dtype=np.int64),
        "ethnicity": np.array(0, dtype=np.int64),
        "language": np.array(language, dtype=np.int64),
        "maritalstatus": np.array(-1, dtype=np.int64),
        "age": np.array(61.5),
        "md": np.array(-2.3),
        "slo_fundus": rng.integers(0, 256, SLO, dtype=np.uint8) if slo else np.zeros((0,), np.uint8),
        "oct_bscans": rng.integers(0, 256, (oct_depth, 4, 3), dtype=np.uint8),
    }
    np.savez(all_dir / name, **arrays)
    return arrays


def write_site_csv(root, site, attribute, split, filenames):
    with open(root / f"meta_site{site}_{attribute}_{split}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "glaucoma", attribute])
        writer.writerows([name, 0, 0] for name in filenames)


@pytest.fixture()
def fairfedmed(tmp_path):
    """Two sites: site1 train has an unknown-race row and a row whose file is missing."""
    root = tmp_path / "fairfedmed"
    all_dir = root / "all"
    all_dir.mkdir(parents=True)
    saved = {
        "data_00001.npz": write_patient(all_dir, "data_00001.npz", race=2, glaucoma=1, seed=1),
        "data_00002.npz": write_patient(all_dir, "data_00002.npz", race=-1, glaucoma=0, seed=2),
        "data_00003.npz": write_patient(all_dir, "data_00003.npz", race=0, glaucoma=0, language=-1, seed=3),
        "data_00004.npz": write_patient(all_dir, "data_00004.npz", race=1, glaucoma=1, seed=4),
        "data_00005.npz": write_patient(all_dir, "data_00005.npz", race=1, glaucoma=0, seed=5),
    }
    write_site_csv(root, 1, "race", "train", ["data_00001.npz", "data_00002.npz", "data_09999.npz", "data_00003.npz"])
    write_site_csv(root, 1, "race", "test", ["data_00004.npz"])
    write_site_csv(root, 2, "race", "train", ["data_00004.npz", "data_00005.npz"])
    write_site_csv(root, 1, "language", "train", ["data_00001.npz", "data_00003.npz"])
    (root / "meta_all.csv").write_text("filename\n" + "\n".join(saved) + "\n")
    return root, saved


def test_fairfedmed_sites_in_numeric_order(fairfedmed, tmp_path):
    root, _ = fairfedmed
    write_site_csv(root, 10, "race", "train", [])
    assert fairfedmed_sites(root) == ["site1", "site2", "site10"]
    assert fairfedmed_sites(tmp_path) == ["site1", "site2", "site10"]  # parent DATA/ dir works too
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no meta_site"):
        fairfedmed_sites(empty)


def test_fairfedmed_skips_unknown_attribute_and_missing_files_with_counts(fairfedmed, caplog):
    root, _ = fairfedmed
    with caplog.at_level(logging.INFO, logger="fedlowrank.datasets.fairfedmed"):
        data = load_fairfedmed(root, site="site1", split="train", attribute="race")
    assert isinstance(data, FairFedMedSet) and isinstance(data, ImageSet)
    assert data.filenames == ("data_00001.npz", "data_00003.npz")
    assert dict(data.skipped) == {"unknown_attribute": 1, "missing_file": 1, "empty_image": 0}
    assert data.num_skipped == 2
    assert "skipped" in caplog.text and "'missing_file': 1" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)  # a missing file is not routine
    np.testing.assert_array_equal(data.groups, [2, 0])
    np.testing.assert_array_equal(data.labels, [1, 0])
    assert data.group_names == ("Asian", "Black", "White")
    assert data.groups.dtype == np.int64 and data.labels.dtype == np.int64


def test_fairfedmed_slo_images_match_reference_orientation_and_scale(fairfedmed):
    root, saved = fairfedmed
    data = load_fairfedmed(root, site=1)
    # The reference loader transposes slo_fundus: (6, 5) stored -> (1, 5, 6).
    assert data.images.shape == (2, 1, SLO[1], SLO[0]) and data.images.dtype == np.float32
    np.testing.assert_allclose(data.images[0, 0], saved["data_00001.npz"]["slo_fundus"].T / 255.0, rtol=1e-6)


def test_fairfedmed_site_filtering_and_all_sites(fairfedmed):
    root, _ = fairfedmed
    site2 = load_fairfedmed(root, site="site2")
    assert site2.filenames == ("data_00004.npz", "data_00005.npz")
    np.testing.assert_array_equal(site2.labels, [1, 0])
    assert load_fairfedmed(root, site="2").filenames == site2.filenames
    everything = load_fairfedmed(root)  # site1 then site2
    assert everything.filenames == ("data_00001.npz", "data_00003.npz", "data_00004.npz", "data_00005.npz")
    assert everything.skipped["missing_file"] == 1 and everything.skipped["unknown_attribute"] == 1
    test = load_fairfedmed(root, site=1, split="test")
    assert test.filenames == ("data_00004.npz",)
    with pytest.raises(ValueError, match=r"unknown FairFedMed site 'site7'.*\['site1', 'site2'\]"):
        load_fairfedmed(root, site="site7")


def test_fairfedmed_other_attribute_uses_its_csv_and_names(fairfedmed):
    root, _ = fairfedmed
    data = load_fairfedmed(root, site=1, attribute="language")
    # data_00003 has language -1 (unknown) although its race is known.
    assert data.filenames == ("data_00001.npz",)
    assert data.skipped["unknown_attribute"] == 1
    assert data.group_names == ("English", "Spanish", "Other")
    with pytest.raises(FileNotFoundError, match=r"meta_site2_language_train\.csv.*attributes \['race'\]"):
        load_fairfedmed(root, site=2, attribute="language")


def test_fairfedmed_gender_falls_back_to_male_key(tmp_path):
    root = tmp_path
    (root / "all").mkdir()
    for i, male in enumerate([1, 0, -1]):
        arrays = {"slo_fundus": np.full(SLO, 255, np.uint8), "glaucoma": np.array(1.0), "male": np.array(male)}
        np.savez(root / "all" / f"p{i}.npz", **arrays)
    write_site_csv(root, 1, "gender", "train", ["p0.npz", "p1.npz", "p2.npz"])
    data = load_fairfedmed(root, site=1, attribute="gender")
    np.testing.assert_array_equal(data.groups, [1, 0])
    np.testing.assert_array_equal(data.labels, [1, 1])  # glaucoma stored as float 1.0
    assert data.group_names == ("Female", "Male")
    assert data.images.max() == 1.0


def test_fairfedmed_oct_volumes_and_empty_scans(fairfedmed):
    root, _ = fairfedmed
    all_dir = root / "all"
    write_patient(all_dir, "oct_a.npz", race=0, glaucoma=1, oct_depth=5, seed=7)
    write_patient(all_dir, "oct_b.npz", race=2, glaucoma=0, oct_depth=0, seed=8)  # no OCT scan
    write_site_csv(root, 3, "race", "train", ["oct_a.npz", "oct_b.npz"])
    data = load_fairfedmed(root, site=3, image_key="oct_bscans")
    assert data.images.shape == (1, 1, 5, 4, 3)  # 3 wide, still a volume, not RGB
    assert dict(data.skipped) == {"unknown_attribute": 0, "missing_file": 0, "empty_image": 1}


def test_fairfedmed_errors_name_what_is_wrong(fairfedmed):
    root, _ = fairfedmed
    with pytest.raises(ValueError, match=r"unknown split 'val'.*\('train', 'test', 'all'\)"):
        load_fairfedmed(root, split="val")
    with pytest.raises(ValueError, match=r"data_00001\.npz has no key 'disease'"):
        load_fairfedmed(root, site=1, label_key="disease")
    with pytest.raises(ValueError, match=r"data_00001\.npz has no key 'fundus'"):
        load_fairfedmed(root, site=1, image_key="fundus")
    with open(root / "meta_site2_race_test.csv", "w") as handle:
        handle.write("file,race\ndata_00004.npz,1\n")
    with pytest.raises(ValueError, match=r"meta_site2_race_test\.csv has no 'filename' column"):
        load_fairfedmed(root, site=2, split="test")
    write_site_csv(root, 4, "race", "train", ["gone.npz"])
    with pytest.raises(ValueError, match=r"no usable rows.*'missing_file': 1"):
        load_fairfedmed(root, site=4)


def test_fairfedmed_code_without_a_name_is_an_error(tmp_path):
    (tmp_path / "all").mkdir()
    np.savez(tmp_path / "all" / "p.npz", slo_fundus=np.zeros(SLO, np.uint8), glaucoma=np.array(0), race=np.array(5))
    write_site_csv(tmp_path, 1, "race", "train", ["p.npz"])
    with pytest.raises(ValueError, match=r"p\.npz: race code 5 has no name"):
        load_fairfedmed(tmp_path, site=1)


def test_datasets_package_imports_neither_flwr_nor_pandas():
    code = ("import sys, fedlowrank.datasets; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'pandas')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fairfedmed_attribute_from_csv_when_npz_lacks_it(tmp_path):
    (tmp_path / "all").mkdir()
    for i in range(3):
        np.savez(tmp_path / "all" / f"p{i}.npz", slo_fundus=np.zeros(SLO, np.uint8), glaucoma=np.array(i % 2))
    with open(tmp_path / "meta_site1_ethnicity_train.csv", "w", newline="") as handle:
        handle.write("filename,ethnicity\np0.npz,1\np1.npz,\np2.npz,-1\n")  # empty cell = unrecorded
    data = load_fairfedmed(tmp_path, site=1, attribute="ethnicity")
    assert data.filenames == ("p0.npz",) and data.groups.tolist() == [1]
    assert data.skipped["unknown_attribute"] == 2
    assert data.group_names == ("Non-Hispanic", "Hispanic")
    with open(tmp_path / "meta_site1_ethnicity_train.csv", "w", newline="") as handle:
        handle.write("filename,ethnicity\np0.npz,hispanic\n")
    with pytest.raises(ValueError, match=r"'ethnicity'.*holds 'hispanic', not an integer code"):
        load_fairfedmed(tmp_path, site=1, attribute="ethnicity")
    with open(tmp_path / "meta_site1_ethnicity_train.csv", "w", newline="") as handle:
        handle.write("filename\np0.npz\n")
    with pytest.raises(ValueError, match=r"p0\.npz has no attribute key 'ethnicity' or 'hispanic'"):
        load_fairfedmed(tmp_path, site=1, attribute="ethnicity")
