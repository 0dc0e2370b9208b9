"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, and scikit-learn's digits.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017; MIT licence) ships as four gzipped IDX
files: ``train-images-idx3-ubyte.gz`` (60,000 grey 28x28 images),
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
``t10k-labels-idx1-ubyte.gz`` (10,000 test images). ``apt-get install
dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``; nothing is
downloaded here. Where the package is missing, :func:`load_digits_images` gives
scikit-learn's bundled 8x8 digits (1,797 images) in the same form.

Core module: numpy and the standard library only (scikit-learn imported on demand).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .images import UNKNOWN_GROUP, ImageSet, to_unit_float

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
"""Fashion-MNIST's label ``i`` is ``CLASS_NAMES[i]``."""

# A binary task whose rule depends on a group no pixel shows (the per-group setting of
# the imaging app and of benchmarks/experiment.py): class ``c`` is positive for group
# ``g`` when ``c in GROUP_RULES[g]``. The groups agree on five classes (Pullover and Coat
# positive; Trouser, Dress and Bag negative) and disagree on five (T-shirt/top and Shirt:
# A only; Sandal, Sneaker and Ankle boot: B only), so one shared model must compromise.
GROUP_RULES: dict[int, frozenset[int]] = {
    0: frozenset({0, 2, 4, 6}),  # group A, upper body: T-shirt/top, Pullover, Coat, Shirt
    1: frozenset({2, 4, 5, 7, 9}),  # group B, outerwear or footwear: Pullover, Coat, Sandal, Sneaker, Ankle boot
}
GROUP_NAMES = ("A (upper body)", "B (outerwear/footwear)")
"""Names of groups 0 and 1 of :data:`GROUP_RULES`."""


# IDX header: two zero bytes, the element type (0x08 = unsigned byte), the number of
# dimensions, then one big-endian int32 per dimension.
_UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) of unsigned bytes.

    Parameters
    ----------
    path : str or os.PathLike
        The file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        uint8 array of the shape the header gives.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the header is not an unsigned-byte IDX header or the data length does not
        match the shape it gives (a truncated download, another format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'empty'}, expected 0000 08 <ndim>)")
    if raw[2] != _UBYTE:
        raise ValueError(f"{path}: IDX element type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header announces {ndim} dimensions but the file has {len(raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: shape {shape} needs {expected} bytes, the file has {len(raw)} (truncated or corrupt?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_fashion_mnist(root: str | os.PathLike = DEFAULT_ROOT, split: str = "train") -> ImageSet:
    """One split of Fashion-MNIST from its IDX ``.gz`` files.

    Parameters
    ----------
    root : str or os.PathLike (default: ``/usr/share/datasets/fashion-mnist``)
        The folder holding the four ``*-idx*-ubyte.gz`` files (Debian's
        ``dataset-fashion-mnist`` package installs them there).
    split : {"train", "test"}
        ``train`` (60,000 images) or ``test`` (the 10,000 ``t10k`` images).

    Returns
    -------
    ImageSet
        Images (N, 1, 28, 28) float32 in [0, 1], labels (N,) in 0..9 (see
        :data:`CLASS_NAMES`), groups all -1: Fashion-MNIST has no group attribute.

    Raises
    ------
    FileNotFoundError
        If a file is missing; the message says how to install the package or to use
        :func:`load_digits_images` instead.
    ValueError
        For an unknown split, a file that is not IDX, or images and labels of
        different counts.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}: expected one of {sorted(SPLITS)}")
    root = Path(root)
    prefix = SPLITS[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, into /usr/share/datasets/fashion-mnist), "
            "point root at a folder with the four *-idx*-ubyte.gz files, or use the small fallback of scikit-learn's "
            "8x8 digits (the imaging app: --run-config \"dataset='digits'\"; in code: fedlowrank.datasets.load_digits_images())"
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{root}: expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return ImageSet(
        np.ascontiguousarray(to_unit_float(images[:, None], str(images_path))),
        labels.astype(np.int64),
        np.full(len(labels), UNKNOWN_GROUP, dtype=np.int64),
    )


def load_digits_images() -> ImageSet:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, classes 0..9).

    The small fallback where Fashion-MNIST is not installed: shipped inside
    scikit-learn, so nothing is downloaded.

    Returns
    -------
    ImageSet
        Images (1797, 1, 8, 8) float32 in [0, 1] (the stored 0..16 divided by 16),
        labels (1797,) in 0..9, groups all -1.

    Raises
    ------
    ImportError
        If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("load_digits_images needs scikit-learn (pip install scikit-learn)") from err
    digits = load_digits()
    # The stored values are counts of 0..16 set pixels in 4x4 cells of the original scan.
    images = (np.asarray(digits.images, dtype=np.float32) / np.float32(16.0))[:, None]
    labels = np.asarray(digits.target, dtype=np.int64)
    return ImageSet(np.ascontiguousarray(images), labels, np.full(len(labels), UNKNOWN_GROUP, dtype=np.int64))


def rule_table() -> list[tuple[str, bool, bool]]:
    """``(class name, positive for A, positive for B)`` for each Fashion-MNIST class."""
    return [(name, c in GROUP_RULES[0], c in GROUP_RULES[1]) for c, name in enumerate(CLASS_NAMES)]


def relabel_by_group(classes: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Binary labels (int64 0/1) from 10-class labels and group ids by :data:`GROUP_RULES`.

    Raises
    ------
    ValueError
        If a group id is not 0 or 1 (the rule is defined for both groups only), or a
        class is outside 0..9; the message names the values.
    """
    classes, groups = np.asarray(classes), np.asarray(groups)
    if classes.shape != groups.shape:
        raise ValueError(f"classes {classes.shape} and groups {groups.shape} must have the same shape")
    bad = sorted(set(groups[(groups != 0) & (groups != 1)].tolist()))
    if bad:
        raise ValueError(f"group ids must be 0 or 1 to pick a labelling rule; got {bad[:5]}")
    bad = sorted(set(classes[(classes < 0) | (classes > 9)].tolist()))
    if bad:
        raise ValueError(f"classes must be in 0..9; got {bad[:5]}")
    positive = np.where(groups == 0, np.isin(classes, sorted(GROUP_RULES[0])), np.isin(classes, sorted(GROUP_RULES[1])))
    return positive.astype(np.int64)
