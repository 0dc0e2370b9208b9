"""MedMNIST v2/v3 ``.npz`` files (https://medmnist.com, Yang et al. 2023).

Each file holds ``{split}_images`` and ``{split}_labels`` for the splits ``train``,
``val`` and ``test``. Images are uint8: (N, H, W) for grey 2-D sets, (N, H, W, 3) for
RGB 2-D sets (PathMNIST, DermaMNIST, BloodMNIST, RetinaMNIST) and (N, D, H, W) for the
3-D sets (OrganMNIST3D, NoduleMNIST3D, ...). Labels are (N, 1) integers, or (N, K) 0/1
for the multi-label ChestMNIST.

MedMNIST carries no demographics, so every group is -1 (unknown) unless the caller
supplies codes.

Core module: numpy only, never imports flwr or pandas.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .images import UNKNOWN_GROUP, ImageSet, check_groups, to_unit_float

SPLITS = ("train", "val", "test")
_RGB_CHANNELS = 3


def load_medmnist(
    path: str | os.PathLike,
    split: str = "train",
    groups: Sequence[int] | np.ndarray | None = None,
    group_names: Sequence[str] = (),
) -> ImageSet:
    """Load one split of a MedMNIST ``.npz`` file as channels-first float32 images.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file, e.g. ``pathmnist_64.npz``.
    split : {"train", "val", "test"}
        Which split to read.
    groups : array-like of int, optional
        One group code per sample (``-1`` = unknown); all -1 when omitted.
    group_names : sequence of str, optional
        Names of the group codes in ``groups``.

    Returns
    -------
    ImageSet
        Images (N, 1, H, W) grey, (N, 3, H, W) RGB or (N, 1, D, H, W) 3-D, scaled to
        [0, 1]; labels (N,) or (N, K) for multi-label files.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For an unknown split, a missing key, an unexpected shape or dtype, or ``groups``
        that do not match the samples.

    Notes
    -----
    A 4-D image array is read as RGB when its last axis has length 3 and as a 3-D
    volume otherwise; MedMNIST volumes are 28 or 64 voxels wide, so this is unambiguous.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {path}: expected one of {SPLITS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MedMNIST file not found: {path}")
    with np.load(path, allow_pickle=False) as npz:
        raw_images = _read_key(npz, f"{split}_images", path)
        raw_labels = _read_key(npz, f"{split}_labels", path)
    images = _channels_first(raw_images, f"{path}[{split}_images]")
    labels = _labels(raw_labels, f"{path}[{split}_labels]")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} {split}_images but {len(labels)} {split}_labels")
    if groups is None:
        group_ids = np.full(len(images), UNKNOWN_GROUP, dtype=np.int64)
    else:
        group_ids = check_groups(groups, len(images), f"{path} split {split!r}")
    return ImageSet(images, labels, group_ids, tuple(group_names))


def _read_key(npz: np.lib.npyio.NpzFile, key: str, path: str | os.PathLike) -> np.ndarray:
    if key not in npz.files:
        raise ValueError(f"{path} has no key {key!r}; keys present: {sorted(npz.files)}")
    return npz[key]


def _channels_first(raw: np.ndarray, source: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, 3) -> (N, 3, H, W); (N, D, H, W) -> (N, 1, D, H, W)."""
    if raw.ndim == 3:
        out = raw[:, None]
    elif raw.ndim == 4 and raw.shape[-1] == _RGB_CHANNELS:
        out = np.moveaxis(raw, -1, 1)
    elif raw.ndim == 4:
        out = raw[:, None]
    else:
        raise ValueError(
            f"{source}: expected images of shape (N, H, W), (N, H, W, 3) or (N, D, H, W), got {raw.shape}"
        )
    # ascontiguousarray: moveaxis returns a strided view, slow to batch from later.
    return np.ascontiguousarray(to_unit_float(out, source))


def _labels(raw: np.ndarray, source: str) -> np.ndarray:
    """(N, 1) -> (N,) single-label; (N, K > 1) stays multi-label; (N,) accepted as is."""
    if not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got dtype {raw.dtype}")
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    elif raw.ndim not in (1, 2):
        raise ValueError(f"{source}: expected labels of shape (N,), (N, 1) or (N, K), got {raw.shape}")
    if raw.size and raw.min() < 0:
        raise ValueError(f"{source}: labels must be >= 0, got {raw.min()}")
    return raw.astype(np.int64)
