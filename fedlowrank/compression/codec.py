"""Codec base class, the codec registry, and the raw ("none") codec.

A codec turns one tensor into a dict of plain numpy arrays (what travels in a
Flower ``ArrayRecord``) and back. A *candidate* is a codec name plus a setting,
written as text ``"<name>:<setting>"`` (``"powersgd:4"``, ``"topk:0.05"``,
``"qsgd:4"``, ``"none"``); the text form is what the server puts in a
``ConfigRecord`` and what the allocator's table columns stand for.

Codecs register themselves with :func:`register_codec`, so new codecs plug in
without touching this module (the same pattern as Opacus'
``register_grad_sampler``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ..registry import Registry

Payload = dict[str, np.ndarray]

_REGISTRY = Registry("Codec", lambda name: ":" not in name and "|" not in name, "must be non-empty, no ':' or '|'")


def register_codec(name: str) -> Callable[[type["Codec"]], type["Codec"]]:
    """Register a :class:`Codec` subclass under ``name`` (class decorator).

    Parameters
    ----------
    name : str
        Codec key used in candidate strings (``"<name>:<setting>"``). Must not
        contain ``":"`` or ``"|"``, which separate the parts of a spec.

    Returns
    -------
    Callable
        The decorator; it returns the class unchanged.

    Raises
    ------
    ValueError
        If the name is malformed or already taken by another class.
    """
    return _REGISTRY.register(name)


def registered_codecs() -> list[str]:
    """Return the names of all registered codecs (sorted)."""
    return _REGISTRY.names()


def get_codec(candidate: "str | tuple[str, Any] | Codec", **options: Any) -> "Codec":
    """Build a codec from a candidate.

    Parameters
    ----------
    candidate : str or tuple or Codec
        ``"powersgd:4"``, ``("powersgd", 4)``, ``"none"``/``("none", None)``, or
        an existing codec (returned as is).
    **options
        Codec options that are not part of the setting (e.g. ``bucket_size``
        for QSGD).

    Returns
    -------
    Codec

    Raises
    ------
    ValueError
        If the codec name is unknown or the setting is invalid for it.
    """
    if isinstance(candidate, Codec):
        return candidate
    if isinstance(candidate, str):
        name, _, text = candidate.partition(":")
        cls = _lookup(name)
        setting = cls.parse_setting(text) if text else None
    else:
        try:
            name, setting = candidate
        except (TypeError, ValueError) as err:
            raise ValueError(f"A candidate is 'name:setting' or (name, setting), got {candidate!r}.") from err
        cls = _lookup(name)
    return cls(setting, **options)


def candidate_key(candidate: "str | tuple[str, Any] | Codec") -> str:
    """Return the canonical text form ``"<name>:<setting>"`` of a candidate."""
    return get_codec(candidate).key


def _lookup(name: str) -> type["Codec"]:
    try:
        return _REGISTRY.classes[name]
    except KeyError:
        raise ValueError(f"Unknown codec {name!r}; registered: {registered_codecs()}.") from None


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes that travel for a payload: the sum of its arrays' ``nbytes``."""
    return int(sum(np.asarray(a).nbytes for a in payload.values()))


class Codec(ABC):
    """A lossy (or lossless) encoder of one tensor into plain numpy arrays.

    Parameters
    ----------
    setting : Any
        The codec's knob (rank, density, bits); validated by
        :meth:`validate_setting`.

    Notes
    -----
    Subclasses implement :meth:`encode` and :meth:`decode`. ``decode`` must
    validate the payload against the declared shape and setting and raise
    ``ValueError`` on anything that does not match, because payloads come
    from remote clients.
    """

    name: ClassVar[str] = ""

    def __init__(self, setting: Any = None) -> None:
        self.setting = self.validate_setting(setting)

    # -- settings ---------------------------------------------------------
    @classmethod
    def validate_setting(cls, setting: Any) -> Any:
        """Check and normalise a setting; return it."""
        return setting

    @classmethod
    def parse_setting(cls, text: str) -> Any:
        """Parse the text after ``":"`` in a candidate string."""
        return text

    def format_setting(self) -> str:
        """Text form of the setting (inverse of :meth:`parse_setting`)."""
        return "" if self.setting is None else str(self.setting)

    def options(self) -> dict[str, int]:
        """Options (besides the setting) the decoder needs; travel in the spec."""
        return {}

    @classmethod
    def from_options(cls, setting: Any, options: Mapping[str, int]) -> "Codec":
        """Rebuild a codec from a setting and :meth:`options` output."""
        if options:
            raise ValueError(f"Codec {cls.name!r} takes no options, got {dict(options)}.")
        return cls(setting)

    @property
    def key(self) -> str:
        """Canonical candidate string, e.g. ``"powersgd:4"`` or ``"none"``."""
        text = self.format_setting()
        return f"{self.name}:{text}" if text else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and (self.key, self.options()) == (other.key, other.options())

    def __hash__(self) -> int:
        return hash((self.key, tuple(sorted(self.options().items()))))

    # -- coding -----------------------------------------------------------
    @abstractmethod
    def encode(
        self,
        x: np.ndarray,
        *,
        state: dict[str, np.ndarray] | None = None,
        rng: np.random.Generator | None = None,
    ) -> Payload:
        """Encode ``x``.

        Parameters
        ----------
        x : np.ndarray
            The tensor (any float dtype; computed on as float64).
        state : dict, optional
            Per-tensor codec state owned by the caller (PowerSGD keeps its
            warm-start ``Q`` here); the codec may read and update it.
        rng : np.random.Generator, optional
            Randomness for stochastic codecs and initialisations.

        Returns
        -------
        dict[str, np.ndarray]
            The arrays that travel.
        """

    @abstractmethod
    def decode(self, payload: Mapping[str, np.ndarray], shape: Sequence[int]) -> np.ndarray:
        """Decode a payload to a float32 array of ``shape``; validate it."""

    def estimate(
        self, x: np.ndarray, *, state: dict[str, np.ndarray] | None = None, rng: np.random.Generator | None = None
    ) -> tuple[float, int]:
        """Compression error and encoded size of this setting on ``x``.

        The default is a trial encode: the exact squared Frobenius error of
        what this codec would lose and the exact payload size. The state is
        copied so a trial never advances the caller's warm start.

        Returns
        -------
        tuple[float, int]
            ``(||x - decode(encode(x))||_F^2, encoded bytes)``.
        """
        trial_state = None if state is None else dict(state)
        payload = self.encode(x, state=trial_state, rng=rng)
        decoded = self.decode(payload, x.shape)
        err = float(np.sum((np.asarray(x, dtype=np.float64) - decoded) ** 2))
        return err, payload_nbytes(payload)

    @abstractmethod
    def layout(self, shape: Sequence[int]) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """The fields :meth:`encode` produces for a tensor of ``shape``, in order.

        Every built-in codec's payload layout (field names, dtypes, shapes)
        depends only on the shape and the setting, never on the values. That
        is what lets the server compute the allocator's size table itself,
        and what lets a whole update travel as one byte stream that the
        decoder cuts into fields (``fedlowrank.compression.update``).

        Returns
        -------
        list of (name, dtype, shape)
        """

    def encoded_size(self, shape: Sequence[int]) -> int:
        """Exact bytes :meth:`encode` produces for a tensor of ``shape`` (from :meth:`layout`)."""
        return int(sum(np.dtype(dt).itemsize * int(np.prod(s, dtype=np.int64)) for _, dt, s in self.layout(shape)))

    @classmethod
    def estimate_many(
        cls,
        x: np.ndarray,
        codecs: Sequence["Codec"],
        *,
        state: dict[str, np.ndarray] | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[tuple[float, int]]:
        """:meth:`estimate` for several settings of this codec on one tensor.

        Subclasses override this where all settings share one cheap
        computation (one SVD for all PowerSGD ranks, one sort for all Top-K
        densities).
        """
        return [c.estimate(x, state=state, rng=rng) for c in codecs]

    # -- helpers for subclasses -------------------------------------------
    def _expect_fields(self, payload: Mapping[str, np.ndarray], fields: set[str]) -> None:
        got = set(payload)
        if got != fields:
            raise ValueError(f"{self.key}: payload fields {sorted(got)} do not match expected {sorted(fields)}.")

    def _expect_array(
        self, payload: Mapping[str, np.ndarray], field: str, dtype: Any, shape: tuple[int, ...]
    ) -> np.ndarray:
        arr = payload[field]
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{self.key}: field {field!r} is not a numpy array.")
        if arr.dtype != np.dtype(dtype):
            raise ValueError(f"{self.key}: field {field!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}.")
        if arr.shape != tuple(shape):
            raise ValueError(f"{self.key}: field {field!r} has shape {arr.shape}, expected {tuple(shape)}.")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"{self.key}: field {field!r} holds non-finite values.")
        return arr


@register_codec("none")
class RawCodec(Codec):
    """No compression: the tensor travels as float32 (the reference candidate)."""

    @classmethod
    def validate_setting(cls, setting: Any) -> None:
        if setting not in (None, ""):
            raise ValueError(f"Codec 'none' takes no setting, got {setting!r}.")
        return None

    def encode(self, x, *, state=None, rng=None) -> Payload:
        return {"raw": np.array(x, dtype=np.float32)}  # np.array keeps 0-d shapes

    def layout(self, shape):
        return [("raw", np.dtype(np.float32), tuple(int(s) for s in shape))]

    def decode(self, payload, shape) -> np.ndarray:
        self._expect_fields(payload, {"raw"})
        return self._expect_array(payload, "raw", np.float32, tuple(shape)).copy()
