"""Small linear-algebra helpers the aggregation modules share (orthonormal ranges, basis completion)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def small_lapack() -> Iterator[None]:
    """Run small (K r x K r) factorisations on one thread.

    On a loaded machine (a simulation's clients share the cores with the server) MKL's
    threaded eigh/SVD of a 512 x 512 matrix took 4-7 s instead of 0.03 s on one thread:
    the threads wait on each other. These matrices are too small to gain from threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def orthonormal_range(stacked: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q, R`` with ``stacked = Q R``, ``Q`` orthonormal (d x m'), ``R`` (m' x m).

    ``"qr"``: Householder thin QR, accurate for any input.
    ``"gram"``: Cholesky QR in float64: one GEMM for the m x m Gram matrix and a
    Cholesky factor, several times faster than a QR on CPU. It squares the condition
    number, which float64 absorbs up to about 1e7; when the Gram matrix is not
    numerically positive definite (clients that agree to rounding error), it falls back
    to an eigendecomposition that drops directions below ``sqrt(eps)`` of the largest.
    ``Q`` is returned in the input dtype, ``R`` in float64.
    """
    if method == "qr":
        return torch.linalg.qr(stacked, mode="reduced")
    if method != "gram":
        raise ValueError(f"unknown method {method!r}; use 'qr' or 'gram'")
    wide = stacked.double()
    gram = wide.T @ wide
    with small_lapack():
        lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool(torch.isfinite(lower).all()):
        # Condition of R is the square root of the Gram's: trust it while that stays small.
        diag = lower.diagonal()
        if float(diag.min()) > float(diag.max()) * 1e-7:
            r = lower.T
            q = torch.linalg.solve_triangular(lower, wide.T, upper=False).T
            return q.to(stacked.dtype), r
    with small_lapack():
        evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals[-1].clamp_min(0) * torch.finfo(torch.float64).eps * stacked.shape[1]
    root = evals[keep].sqrt()
    basis = evecs[:, keep]
    q = wide @ (basis / root)
    return q.to(stacked.dtype), root[:, None] * basis.T


def complete_basis(q: torch.Tensor, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend orthonormal columns ``q`` (d x m) to ``width`` orthonormal columns."""
    missing = width - q.shape[1]
    if missing <= 0:
        return q[:, :width]
    fill = torch.randn(q.shape[0], missing, dtype=q.dtype, device=q.device, generator=generator)
    fill -= q @ (q.T @ fill)
    extra, _ = torch.linalg.qr(fill)
    return torch.cat([q, extra], dim=1)
