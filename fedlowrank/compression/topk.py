"""Top-K sparsification: keep the largest-magnitude fraction of entries."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .codec import Codec, Payload, register_codec


@register_codec("topk")
class TopKCodec(Codec):
    """Keep ``k = max(1, ceil(density * size))`` largest-magnitude entries.

    Parameters
    ----------
    setting : float
        Density in ``(0, 1]``.

    Notes
    -----
    Payload: ``{"idx": uint (k,), "val": float32 (k,)}``; flat indices in
    strictly increasing order (so the decoder can check uniqueness and range
    in one pass), in the smallest unsigned type that holds every index of the
    tensor (:func:`index_dtype`: uint8 up to 256 entries, uint16 up to 65,536,
    else uint32). Encoded size is ``k (itemsize + 4)`` bytes: for the adapter
    factors of a small model (a few thousand entries) that is 6 bytes per kept
    entry, not the 8 of int32 indices.
    """

    @classmethod
    def validate_setting(cls, setting: Any) -> float:
        try:
            density = float(setting)
        except (TypeError, ValueError):
            raise ValueError(f"Top-K density must be a number in (0, 1], got {setting!r}.") from None
        if not (0.0 < density <= 1.0):
            raise ValueError(f"Top-K density must be in (0, 1], got {density!r}.")
        return density

    @classmethod
    def parse_setting(cls, text: str) -> float:
        return cls.validate_setting(text)

    def format_setting(self) -> str:
        return repr(self.setting)

    def num_kept(self, size: int) -> int:
        """Number of entries kept for a tensor of ``size`` entries."""
        if size == 0:
            return 0
        return min(size, max(1, math.ceil(self.setting * size)))

    def layout(self, shape):
        """``k`` indices and ``k`` float32 values: ``k (itemsize + 4)`` bytes."""
        size = int(np.prod(shape, dtype=np.int64))
        k = self.num_kept(size)
        return [("idx", index_dtype(size), (k,)), ("val", np.dtype(np.float32), (k,))]

    def encode(self, x, *, state=None, rng=None) -> Payload:
        flat = np.asarray(x, dtype=np.float64).ravel()
        k = self.num_kept(flat.size)
        dtype = index_dtype(flat.size)
        if k < flat.size:
            idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
            idx.sort()
        else:
            idx = np.arange(flat.size)
        return {"idx": idx.astype(dtype), "val": flat[idx].astype(np.float32)}

    def decode(self, payload, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        size = int(np.prod(shape, dtype=np.int64))
        k = self.num_kept(size)
        self._expect_fields(payload, {"idx", "val"})
        idx = self._expect_array(payload, "idx", index_dtype(size), (k,)).astype(np.int64)
        val = self._expect_array(payload, "val", np.float32, (k,))
        if k and idx[-1] >= size:
            raise ValueError(f"{self.key}: index out of range [0, {size}).")
        if k > 1 and np.any(np.diff(idx) <= 0):
            raise ValueError(f"{self.key}: indices must be strictly increasing (sorted, unique).")
        out = np.zeros(size, dtype=np.float32)
        out[idx] = val
        return out.reshape(shape)

    @classmethod
    def estimate_many(cls, x, codecs, *, state=None, rng=None) -> list[tuple[float, int]]:
        """One sort of squared magnitudes gives the dropped energy for every k.

        The error counts the dropped entries exactly; the float32 rounding of
        the kept values (relative 1e-7) is ignored.
        """
        sq = np.sort(np.asarray(x, dtype=np.float64).ravel() ** 2)  # ascending
        # dropped[j] = energy of the j smallest entries.
        dropped = np.concatenate([[0.0], np.cumsum(sq)])
        out = []
        for codec in codecs:
            k = codec.num_kept(sq.size)
            out.append((float(dropped[sq.size - k]), codec.encoded_size(np.shape(x))))
        return out

    def estimate(self, x, *, state=None, rng=None) -> tuple[float, int]:
        return self.estimate_many(x, [self])[0]


def index_dtype(size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every flat index of ``size`` entries."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size <= int(np.iinfo(dtype).max) + 1:
            return np.dtype(dtype)
    raise ValueError(f"Top-K: a tensor of {size} entries does not fit uint32 indices.")
