"""PowerSGD: rank-k compression by one warm-started power iteration.

Follows the algorithm of torch's ``powerSGD_hook.py`` (Vogels et al., 2019):
view the tensor as ``M`` (``shape[0]`` x rest), ``P = M Q``, orthonormalise
``P``, ``Q = M^T P``, send ``P`` and ``Q``; the receiver forms ``P Q^T``. The
new ``Q`` is kept in the caller's per-tensor state and warm-starts the next
round, so over rounds the iteration converges towards the top-k subspace.

Tensors that are 1-D, or whose factors would not be smaller than the tensor
(``(n + m) k >= n m``), travel raw as float32, as torch's hook does for
tensors it should not compress.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .codec import Codec, Payload, register_codec


@register_codec("powersgd")
class PowerSGDCodec(Codec):
    """Rank-``k`` PowerSGD codec.

    Parameters
    ----------
    setting : int
        The rank ``k`` (>= 1). It is capped at ``min(n, m)`` per tensor.

    Notes
    -----
    Payload: ``{"p": float32 (n, k'), "q": float32 (m, k')}`` with
    ``k' = min(k, n, m)``, or ``{"raw": float32 shape}`` for the fallback.
    The state key ``"q"`` holds the warm-start ``Q`` (float64, ``(m, k')``).
    """

    @classmethod
    def validate_setting(cls, setting: Any) -> int:
        if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or setting < 1:
            raise ValueError(f"PowerSGD rank must be an integer >= 1, got {setting!r}.")
        return int(setting)

    @classmethod
    def parse_setting(cls, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"PowerSGD rank must be an integer, got {text!r}.") from None

    # -- geometry ---------------------------------------------------------
    @staticmethod
    def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
        """``(n, m)`` of the matrix view, like torch's ``tensor.view(n, -1)``."""
        n = int(shape[0])
        m = int(np.prod(shape[1:], dtype=np.int64)) if n else 0
        return n, m

    def effective_rank(self, shape: tuple[int, ...]) -> int:
        """Rank actually sent for ``shape``, or 0 when the tensor goes raw."""
        if len(shape) < 2:
            return 0
        n, m = self.matrix_shape(shape)
        k = min(self.setting, n, m)
        # Factors no smaller than the tensor: compressing would only add error.
        if k == 0 or (n + m) * k >= n * m:
            return 0
        return k

    def layout(self, shape):
        """Float32 factors ``p (n, k')``, ``q (m, k')``: ``4 (n + m) k'`` bytes; raw float32 when ``k' = 0``."""
        shape = tuple(int(s) for s in shape)
        k = self.effective_rank(shape)
        if k == 0:
            return [("raw", np.dtype(np.float32), shape)]
        n, m = self.matrix_shape(shape)
        return [("p", np.dtype(np.float32), (n, k)), ("q", np.dtype(np.float32), (m, k))]

    # -- coding -----------------------------------------------------------
    def encode(self, x, *, state=None, rng=None) -> Payload:
        x = np.asarray(x, dtype=np.float64)
        k = self.effective_rank(x.shape)
        if k == 0:
            return {"raw": x.astype(np.float32)}
        n, m = self.matrix_shape(x.shape)
        mat = x.reshape(n, m)
        q = self._warm_q(state, m, k, rng)
        p = _orthonormalise(mat @ q)
        q = mat.T @ p
        if state is not None:
            state["q"] = q
        return {"p": p.astype(np.float32), "q": q.astype(np.float32)}

    @staticmethod
    def _warm_q(state, m: int, k: int, rng) -> np.ndarray:
        """Previous round's Q if it fits this rank, else a fresh Gaussian one."""
        if state is not None:
            q = state.get("q")
            if q is not None and q.shape == (m, k) and np.all(np.isfinite(q)):
                return np.asarray(q, dtype=np.float64)
        rng = rng if rng is not None else np.random.default_rng(0)
        return rng.standard_normal((m, k))

    def decode(self, payload, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        k = self.effective_rank(shape)
        if k == 0:
            self._expect_fields(payload, {"raw"})
            return self._expect_array(payload, "raw", np.float32, shape).copy()
        self._expect_fields(payload, {"p", "q"})
        n, m = self.matrix_shape(shape)
        p = self._expect_array(payload, "p", np.float32, (n, k))
        q = self._expect_array(payload, "q", np.float32, (m, k))
        return (p @ q.T).reshape(shape)

    # -- cheap error tables -----------------------------------------------
    @classmethod
    def estimate_many(cls, x, codecs, *, state=None, rng=None) -> list[tuple[float, int]]:
        """Best-rank-k tail of the singular values, one SVD for all ranks.

        The error is ``sum_{i > k} sigma_i^2``, the exact error of the *best*
        rank-k approximation (Eckart-Young). One warm-started power iteration
        can only do as well or worse, so this is an optimistic estimate that
        becomes tight as the warm start converges. Sizes are exact.
        """
        x = np.asarray(x, dtype=np.float64)
        out: list[tuple[float, int]] = []
        tails = None
        for codec in codecs:
            k = codec.effective_rank(x.shape)
            if k == 0:
                raw_err = float(np.sum((x - x.astype(np.float32)) ** 2))
                out.append((raw_err, x.size * 4))
                continue
            if tails is None:
                n, m = cls.matrix_shape(x.shape)
                sq = np.linalg.svd(x.reshape(n, m), compute_uv=False) ** 2
                # tails[k] = sum of squared singular values beyond the k-th.
                tails = np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])
            n, m = cls.matrix_shape(x.shape)
            out.append((float(tails[k]), (n + m) * k * 4))
        return out

    def estimate(self, x, *, state=None, rng=None) -> tuple[float, int]:
        return self.estimate_many(x, [self])[0]


def _orthonormalise(p: np.ndarray) -> np.ndarray:
    """Orthonormal basis of ``p``'s columns (thin QR, like torch's hook).

    Householder QR keeps working when ``p`` is rank-deficient (e.g. an all-zero
    update), where plain Gram-Schmidt would divide by zero.
    """
    q, r = np.linalg.qr(p)
    # Fix signs so the basis is a deterministic function of p.
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs
