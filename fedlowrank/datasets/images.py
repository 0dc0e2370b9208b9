"""The in-memory image set every loader in :mod:`fedlowrank.datasets` returns.

Core module: numpy only, never imports flwr or pandas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNKNOWN_GROUP = -1


@dataclass(frozen=True, eq=False)  # eq=False: elementwise == on arrays has no single truth value
class ImageSet:
    """Images, labels and demographic group ids of one split, channels first.

    Parameters
    ----------
    images : numpy.ndarray
        float32 in [0, 1], shape (N, C, H, W) for 2-D images or (N, C, D, H, W) for
        volumes.
    labels : numpy.ndarray
        int64, shape (N,) for single-label tasks or (N, K) for multi-label tasks.
    groups : numpy.ndarray
        int64, shape (N,): the sample's group code, ``-1`` where unknown.
    group_names : tuple of str, optional
        ``group_names[g]`` names group code ``g``; empty when the codes are unnamed.

    Raises
    ------
    ValueError
        If a field has the wrong dtype or rank, the lengths differ, a group code is
        below -1, or a group code has no name while names are given.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    group_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_array("images", self.images, np.float32, (4, 5))
        _check_array("labels", self.labels, np.int64, (1, 2))
        _check_array("groups", self.groups, np.int64, (1,))
        n = len(self.images)
        if len(self.labels) != n or len(self.groups) != n:
            raise ValueError(
                f"inconsistent lengths: {n} images, {len(self.labels)} labels, "
                f"{len(self.groups)} groups"
            )
        if n and self.groups.min() < UNKNOWN_GROUP:
            raise ValueError(f"group codes must be >= -1 (-1 = unknown), got {self.groups.min()}")
        if not isinstance(self.group_names, tuple) or not all(isinstance(s, str) for s in self.group_names):
            raise ValueError(f"group_names must be a tuple of str, got {self.group_names!r}")
        if self.group_names and n and self.groups.max() >= len(self.group_names):
            raise ValueError(
                f"group code {self.groups.max()} has no name: group_names has "
                f"{len(self.group_names)} entries {self.group_names}"
            )

    def __len__(self) -> int:
        return len(self.images)


def _check_array(name: str, value: object, dtype: type, ranks: tuple[int, ...]) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != dtype:
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"{name} must be a numpy array of {np.dtype(dtype).name}, got {got}")
    if value.ndim not in ranks:
        raise ValueError(f"{name} must have {' or '.join(map(str, ranks))} dimensions, got shape {value.shape}")


def to_unit_float(array: np.ndarray, source: str) -> np.ndarray:
    """Scale stored pixel values to float32 in [0, 1].

    Unsigned integers are divided by their dtype's maximum (uint8 by 255), so that the
    scaling does not depend on which pixels a file happens to contain. Floats must
    already lie in [0, 1].

    Parameters
    ----------
    array : numpy.ndarray
        Stored pixel values.
    source : str
        Where the array came from, for error messages (file and key).

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape.

    Raises
    ------
    ValueError
        For signed integer, boolean or non-numeric arrays, and floats outside [0, 1].
    """
    if np.issubdtype(array.dtype, np.unsignedinteger):
        return (array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError(f"{source}: float pixels must lie in [0, 1]; got range "
                             f"[{np.nanmin(array)}, {np.nanmax(array)}]")
        return array.astype(np.float32)
    raise ValueError(f"{source}: pixels must be unsigned integers or floats in [0, 1], got dtype {array.dtype}")


def check_groups(groups: Sequence[int] | np.ndarray, n: int, source: str) -> np.ndarray:
    """Validate caller-supplied group codes and return them as int64.

    Parameters
    ----------
    groups : array-like of int
        One code per sample, ``-1`` where unknown.
    n : int
        Number of samples the codes must match.
    source : str
        What the codes belong to, for error messages.

    Returns
    -------
    numpy.ndarray
        int64 array of shape (n,).

    Raises
    ------
    ValueError
        If the codes are not 1-D integers of length ``n`` or any is below -1.
    """
    arr = np.asarray(groups)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"groups for {source} must have shape ({n},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"groups for {source} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < UNKNOWN_GROUP:
        raise ValueError(f"groups for {source} must be >= -1 (-1 = unknown), got {arr.min()}")
    return arr
