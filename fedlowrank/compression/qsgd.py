"""QSGD-style stochastic quantisation (Alistarh et al., 2017).

Each bucket of ``bucket_size`` consecutive entries (or the whole tensor) is
scaled by its norm; ``|x_i| / ||v|| * s`` (``s = 2^(bits-1) - 1`` levels)
is rounded up or down at random with the probabilities that make the result
unbiased. The signed level ``q`` in ``[-s, s]`` travels offset-binary
(``q + s``, in ``[0, 2^bits - 2]``) at exactly ``bits`` bits per value,
packed most significant bit first into a uint8 stream: a 4-bit setting costs
half a byte per value, not a whole one, which is what makes the QSGD settings
real trade-offs against each other and against PowerSGD/Top-K.

The scale is the max-norm by default: with the paper's L2 norm a 512-entry
bucket at 4 bits loses more energy than it keeps (measured: error 1.3x the
tensor's own energy on Gaussian data), because most entries land on level 0.
``norm="l2"`` gives the paper's variant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .codec import Codec, Payload, register_codec

DEFAULT_BUCKET_SIZE = 512


@register_codec("qsgd")
class QSGDCodec(Codec):
    """Stochastic ``bits``-bit quantisation with a per-bucket norm scale.

    Parameters
    ----------
    setting : int
        Bits per value, 2..16 (one of them is the sign).
    bucket_size : int, default 512
        Entries per norm scale; ``0`` means one scale for the whole tensor.
    norm : {"max", "l2"}, default "max"
        The scale: largest magnitude in the bucket, or its L2 norm (QSGD).

    Notes
    -----
    Payload: ``{"q": uint8 (ceil(size * bits / 8),), "norm": float32
    (num_buckets,)}``. ``q`` is the bit-packed offset-binary level stream
    (see :func:`pack_levels`); the value count is the tensor's size, which
    the decoder knows from the shape, so no count travels. The unused bits
    of the last byte are zero. Decoding is ``norm * q / s``; it is unbiased
    given the float32 norm that travels.
    """

    def __init__(self, setting: Any = None, *, bucket_size: int = DEFAULT_BUCKET_SIZE, norm: str = "max") -> None:
        super().__init__(setting)
        if norm not in ("max", "l2"):
            raise ValueError(f"QSGD norm must be 'max' or 'l2', got {norm!r}.")
        self.norm = norm
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer)) or bucket_size < 0:
            raise ValueError(f"QSGD bucket_size must be an integer >= 0, got {bucket_size!r}.")
        self.bucket_size = int(bucket_size)

    # The bit widths a setting may take (subclasses narrow them).
    min_bits, max_bits = 2, 16

    @classmethod
    def validate_setting(cls, setting: Any) -> int:
        if (
            isinstance(setting, bool)
            or not isinstance(setting, (int, np.integer))
            or not cls.min_bits <= setting <= cls.max_bits
        ):
            raise ValueError(f"{cls.name} bits must be an integer in [{cls.min_bits}, {cls.max_bits}], got {setting!r}.")
        return int(setting)

    @classmethod
    def parse_setting(cls, text: str) -> int:
        try:
            return cls.validate_setting(int(text))
        except ValueError:
            raise ValueError(
                f"{cls.name} bits must be an integer in [{cls.min_bits}, {cls.max_bits}], got {text!r}."
            ) from None

    def options(self) -> dict[str, int]:
        # Options travel as integers in the spec (see update.py).
        return {"bucket_size": self.bucket_size, "l2": int(self.norm == "l2")}

    @classmethod
    def from_options(cls, setting: Any, options) -> "QSGDCodec":
        # Options at their defaults are left out of the spec (see make_spec).
        unknown = set(options) - {"bucket_size", "l2"}
        if unknown:
            raise ValueError(f"QSGD options are bucket_size and l2, got {sorted(unknown)}.")
        l2 = options.get("l2", 0)
        if l2 not in (0, 1):
            raise ValueError(f"QSGD option l2 must be 0 or 1, got {l2!r}.")
        return cls(setting, bucket_size=options.get("bucket_size", DEFAULT_BUCKET_SIZE), norm="l2" if l2 else "max")

    @property
    def levels(self) -> int:
        """Number of positive levels ``s``."""
        return 2 ** (self.setting - 1) - 1

    def packed_size(self, size: int) -> int:
        """Bytes of the packed level stream for ``size`` values."""
        return -(-size * self.setting // 8)

    def num_buckets(self, size: int) -> int:
        """Number of norm scales for a tensor of ``size`` entries."""
        if size == 0:
            return 0
        if self.bucket_size == 0:
            return 1
        return -(-size // self.bucket_size)

    def _bucketed(self, flat: np.ndarray) -> np.ndarray:
        """View ``flat`` as (num_buckets, bucket) rows, zero-padding the last."""
        nb = self.num_buckets(flat.size)
        width = flat.size if self.bucket_size == 0 else self.bucket_size
        padded = np.zeros(nb * width, dtype=flat.dtype)
        padded[: flat.size] = flat
        return padded.reshape(nb, width)

    # The per-bucket float32 scale's field name (sq calls it "step").
    scale_field = "norm"

    def layout(self, shape):
        """``bits`` bits per entry, rounded up to whole bytes, plus a float32 scale per bucket."""
        size = int(np.prod(shape, dtype=np.int64))
        return [("q", np.dtype(np.uint8), (self.packed_size(size),)), (self.scale_field, np.dtype(np.float32), (self.num_buckets(size),))]

    def encode(self, x, *, state=None, rng=None) -> Payload:
        rng = rng if rng is not None else np.random.default_rng()
        flat = np.asarray(x, dtype=np.float64).ravel()
        rows = self._bucketed(flat)
        # The float32 norm is what the decoder sees; quantise against it.
        if self.norm == "l2":
            norm = np.sqrt(np.sum(rows**2, axis=1)).astype(np.float32)
        else:
            norm = np.max(np.abs(rows), axis=1).astype(np.float32)
        safe = np.where(norm > 0, norm, 1.0).astype(np.float64)[:, None]
        scaled = np.minimum(np.abs(rows) / safe * self.levels, self.levels)
        low = np.floor(scaled)
        level = low + (rng.random(scaled.shape) < (scaled - low))
        q = (np.sign(rows) * level).ravel()[: flat.size].astype(np.int64)
        return {"q": pack_levels(q + self.levels, self.setting), "norm": norm}

    def _unpacked_codes(self, payload, size: int) -> np.ndarray:
        """The ``"q"`` field unpacked to ``size`` codes, validated."""
        packed = payload["q"]
        expected = self.packed_size(size)
        # Check the length first, with the bits in the message: a payload
        # encoded at another width shows up here (bits mismatch).
        if isinstance(packed, np.ndarray) and packed.ndim == 1 and packed.size != expected:
            raise ValueError(
                f"{self.key}: field 'q' holds {packed.size} packed bytes, expected {expected} "
                f"({size} values x {self.setting} bits; bits mismatch?)."
            )
        packed = self._expect_array(payload, "q", np.uint8, (expected,))
        try:
            return unpack_levels(packed, size, self.setting)
        except ValueError as err:
            raise ValueError(f"{self.key}: field 'q': {err}") from None

    def decode(self, payload, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        size = int(np.prod(shape, dtype=np.int64))
        self._expect_fields(payload, {"q", "norm"})
        offset = self._unpacked_codes(payload, size)
        norm = self._expect_array(payload, "norm", np.float32, (self.num_buckets(size),))
        # Offset-binary at `bits` bits can still say 2^bits - 1, i.e. level s + 1.
        if size and int(offset.max()) > 2 * self.levels:
            raise ValueError(f"{self.key}: field 'q' holds a level beyond +-{self.levels} (bits mismatch?).")
        if np.any(norm < 0):
            raise ValueError(f"{self.key}: field 'norm' holds a negative scale.")
        q = offset.astype(np.float64) - self.levels
        rows = self._bucketed(q)
        out = (rows * (norm.astype(np.float64)[:, None] / self.levels)).ravel()[:size]
        return out.astype(np.float32).reshape(shape)


def pack_levels(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers at exactly ``bits`` bits each into uint8.

    Parameters
    ----------
    values : np.ndarray
        1-D integers in ``[0, 2^bits)``.
    bits : int
        Bits per value, 1..16.

    Returns
    -------
    np.ndarray
        uint8 of length ``ceil(len(values) * bits / 8)``: the values' bits,
        most significant first, concatenated; the last byte's unused low
        bits are zero.

    Raises
    ------
    ValueError
        If a value does not fit in ``bits`` bits.
    """
    values = np.asarray(values).ravel()
    if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits.")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    # One row of bits per value; packbits pads the tail with zeros.
    bit_matrix = ((values.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel())


def unpack_levels(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_levels`.

    Parameters
    ----------
    packed : np.ndarray
        uint8 stream of exactly ``ceil(count * bits / 8)`` bytes.
    count : int
        Number of values (the decoder knows it from the tensor's shape).
    bits : int
        Bits per value, 1..16.

    Returns
    -------
    np.ndarray
        uint32 ``(count,)``.

    Raises
    ------
    ValueError
        If the length is wrong or the padding bits are not zero (a
        non-canonical stream: the sender packed something else).
    """
    expected = -(-count * bits // 8)
    if packed.dtype != np.uint8 or packed.shape != (expected,):
        raise ValueError(
            f"packed levels are {packed.dtype} {packed.shape}, expected uint8 ({expected},) "
            f"for {count} values at {bits} bits."
        )
    flat = np.unpackbits(packed)
    if np.any(flat[count * bits :]):
        raise ValueError("packed levels have non-zero padding bits.")
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.uint32)).astype(np.uint32)
    return flat[: count * bits].reshape(count, bits).astype(np.uint32) @ weights
