"""Client-side error feedback: what compression lost is sent next round.

For each tensor the client compresses ``c = update + residual`` and keeps
``residual <- c - decode(encode(c))``. Summed over rounds, what the server
receives equals what the client meant to send minus the current residual,
so no information is lost for good, only delayed (Seide et al., 2014;
Karimireddy et al., 2019; the same role ``PowerSGDState.error_dict`` plays
in torch's ``powerSGD_hook.py``).

All state (residuals, codec warm starts, the RNG position) lives in one
:class:`ErrorFeedback` object and exports to ``dict[str, np.ndarray]``, so a
Flower client can keep it in ``Context.state`` as an ``ArrayRecord``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .codec import Codec, Payload, get_codec

logger = logging.getLogger(__name__)

_RESIDUAL = "residual/"
_CODEC = "codec/"
_META = "meta"
_SEP = "::"


class ErrorFeedback:
    """Residuals and codec state of one client, across rounds.

    Parameters
    ----------
    seed : int, default 0
        Seeds the randomness of stochastic codecs and PowerSGD's first ``Q``.
        Each (round, tensor) draws from its own stream, so results do not
        depend on the order in which tensors are encoded.
    codec_options : mapping, optional
        Extra options per codec name, e.g. ``{"qsgd": {"bucket_size": 256}}``.
        They travel in each tensor's spec, so the server decodes accordingly.

    Attributes
    ----------
    residuals : dict[str, np.ndarray]
        Float64 residual per tensor.
    codec_state : dict[str, dict[str, np.ndarray]]
        Per-tensor codec state (PowerSGD's warm-start ``"q"``).
    step : int
        Number of finished rounds (advanced by :meth:`end_round`).
    """

    def __init__(self, seed: int = 0, codec_options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.seed = int(seed)
        self.codec_options = {k: dict(v) for k, v in (codec_options or {}).items()}
        self.residuals: dict[str, np.ndarray] = {}
        self.codec_state: dict[str, dict[str, np.ndarray]] = {}
        self.step = 0

    # -- codecs and randomness ----------------------------------------------
    def codec(self, candidate: str | tuple | Codec) -> Codec:
        """The codec for a candidate, with this client's codec options."""
        if isinstance(candidate, Codec):
            return candidate
        name = candidate.partition(":")[0] if isinstance(candidate, str) else candidate[0]
        return get_codec(candidate, **self.codec_options.get(name, {}))

    def rng(self, name: str, purpose: int = 0) -> np.random.Generator:
        """Independent stream per (seed, round, tensor, purpose)."""
        return np.random.default_rng([self.seed, self.step, zlib.crc32(name.encode()), purpose])

    # -- the feedback loop ------------------------------------------------
    def compensated(self, name: str, update: np.ndarray) -> np.ndarray:
        """``update + residual`` in float64 (the residual resets on a shape change)."""
        update = np.asarray(update, dtype=np.float64)
        residual = self.residuals.get(name)
        if residual is None:
            return update.copy()
        if residual.shape != update.shape:
            # E.g. the adapter rank changed: the old residual has no meaning now.
            logger.warning("ErrorFeedback: %s changed shape %s -> %s; residual reset.", name, residual.shape, update.shape)
            del self.residuals[name]
            self.codec_state.pop(name, None)
            return update.copy()
        return update + residual

    def compress(self, name: str, update: np.ndarray, candidate: str | tuple | Codec) -> tuple[Payload, np.ndarray]:
        """Encode ``update + residual`` and keep what was lost as the new residual.

        Returns
        -------
        payload : dict[str, np.ndarray]
            The codec's arrays (what travels).
        decoded : np.ndarray
            ``decode(payload)`` as the server will see it (float32).
        """
        codec = self.codec(candidate)
        target = self.compensated(name, update)
        state = self.codec_state.setdefault(name, {})
        payload = codec.encode(target, state=state, rng=self.rng(name))
        decoded = codec.decode(payload, target.shape)
        self.residuals[name] = target - decoded
        return payload, decoded

    def tables(
        self, name: str, update: np.ndarray, candidates: Sequence[str | tuple | Codec]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Error and encoded size of every candidate on ``update + residual``.

        Call before :meth:`compress` in the same round. Nothing is changed.
        Errors are squared Frobenius norms: PowerSGD reports the exact
        best-rank-k tail (an optimistic estimate of one power iteration),
        Top-K the exact dropped energy, QSGD and "none" a trial encode.

        Returns
        -------
        errors : np.ndarray
            Float64, one per candidate.
        sizes : np.ndarray
            Int64 encoded bytes, one per candidate.
        """
        target = self.compensated(name, update)
        codecs = [self.codec(c) for c in candidates]
        errors = np.zeros(len(codecs), dtype=np.float64)
        sizes = np.zeros(len(codecs), dtype=np.int64)
        # Group by codec class so shared work (one SVD, one sort) is done once.
        by_class: dict[type, list[int]] = {}
        for i, codec in enumerate(codecs):
            by_class.setdefault(type(codec), []).append(i)
        state = dict(self.codec_state.get(name, {}))
        for cls, idx in by_class.items():
            results = cls.estimate_many(target, [codecs[i] for i in idx], state=state, rng=self.rng(name, purpose=1))
            for i, (err, size) in zip(idx, results):
                errors[i], sizes[i] = err, size
        return errors, sizes

    def end_round(self) -> None:
        """Advance the round counter (fresh random streams next round)."""
        self.step += 1

    def residual_norm(self) -> float:
        """Frobenius norm of all residuals together."""
        return float(np.sqrt(sum(float(np.sum(r**2)) for r in self.residuals.values())))

    # -- persistence ------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Export all state as plain arrays (for ``Context.state``)."""
        out: dict[str, np.ndarray] = {_META: np.array([self.seed, self.step], dtype=np.int64)}
        for name, residual in self.residuals.items():
            out[_RESIDUAL + name] = residual
        for name, fields in self.codec_state.items():
            for field, value in fields.items():
                out[f"{_CODEC}{name}{_SEP}{field}"] = np.asarray(value)
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict` output (codec options are not state)."""
        if _META not in state:
            raise ValueError("ErrorFeedback state lacks its 'meta' entry; not an ErrorFeedback state_dict.")
        meta = np.asarray(state[_META])
        if meta.shape != (2,):
            raise ValueError(f"ErrorFeedback 'meta' must hold [seed, step], got shape {meta.shape}.")
        self.seed, self.step = int(meta[0]), int(meta[1])
        self.residuals, self.codec_state = {}, {}
        for key, value in state.items():
            if key.startswith(_RESIDUAL):
                self.residuals[key[len(_RESIDUAL) :]] = np.asarray(value, dtype=np.float64).copy()
            elif key.startswith(_CODEC) and _SEP in key:
                name, field = key[len(_CODEC) :].rsplit(_SEP, 1)
                self.codec_state.setdefault(name, {})[field] = np.asarray(value).copy()
            elif key != _META:
                raise ValueError(f"Unexpected key {key!r} in ErrorFeedback state.")

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray], **kwargs: Any) -> "ErrorFeedback":
        """Build an instance and :meth:`load_state_dict` into it."""
        ef = cls(**kwargs)
        ef.load_state_dict(state)
        return ef
