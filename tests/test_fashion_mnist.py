"""Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist) and the digits fallback."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedlowrank.datasets import ImageSet, load_digits_images, load_fashion_mnist
from fedlowrank.datasets.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the IDX format: 0x0000, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


@pytest.fixture
def tiny_root(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_split(tmp_path, prefix, images, labels)
        data[prefix] = (images, labels)
    return tmp_path, data


@pytest.mark.parametrize("split,prefix", [("train", "train"), ("test", "t10k")])
def test_idx_files_load_as_unit_scaled_channels_first_images(tiny_root, split, prefix):
    root, data = tiny_root
    images, labels = data[prefix]
    loaded = load_fashion_mnist(root, split)
    assert isinstance(loaded, ImageSet)
    assert loaded.images.shape == (len(labels), 1, 28, 28) and loaded.images.dtype == np.float32
    np.testing.assert_allclose(loaded.images[:, 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(loaded.labels, labels.astype(np.int64))
    assert loaded.labels.dtype == np.int64 and (loaded.groups == -1).all()


def test_missing_files_say_how_to_install_them_or_use_the_digits(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*load_digits_images"):
        load_fashion_mnist(tmp_path / "nowhere", "train")


def test_unknown_split_is_named(tiny_root):
    with pytest.raises(ValueError, match=r"unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist(tiny_root[0], "val")


def test_plain_idx_file_reads_too(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x-idx3-ubyte").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte"), array)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"\x89PNG\r\n\x1a\n", "not an IDX file"),
        (bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + b"\0" * 8, r"element type 0x0d"),
        (idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-1], r"shape \(3, 2, 2\) needs 28 bytes, the file has 27"),
    ],
)
def test_broken_idx_files_are_refused_with_the_reason(tmp_path, content, match):
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(content))
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_images_and_labels_of_different_counts_are_refused(tmp_path):
    write_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="3 train images but 2 labels"):
        load_fashion_mnist(tmp_path, "train")


def test_digits_fallback_is_an_image_set_in_unit_range():
    digits = load_digits_images()
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == np.float32
    assert digits.images.min() == 0.0 and digits.images.max() == 1.0
    assert sorted(np.unique(digits.labels).tolist()) == list(range(10)) and (digits.groups == -1).all()


@pytest.mark.skipif(not Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_debian_files():
    train, test = load_fashion_mnist(), load_fashion_mnist(split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class.
    assert np.bincount(train.labels).tolist() == [6000] * len(CLASS_NAMES)
    assert np.bincount(test.labels).tolist() == [1000] * len(CLASS_NAMES)
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirts, dress: the files' first rows
