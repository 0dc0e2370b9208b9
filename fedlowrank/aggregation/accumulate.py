"""The weighted sum of client adapters, folded in one client at a time.

:class:`WeightedSum` holds, per group ``g``, ``M_g = sum_k w_kg U_k diag(S_k[g]) V_k^T /
sum_k w_kg`` (plus terms added already normalised, such as a carried residual) without
keeping the clients: it stores their factors side by side while the stacked width
``m = sum_k r_k`` stays below ``dense_above`` (default ``min(d_out, d_in) // 2``), and
beyond that switches to a dense ``G x d_out x d_in`` accumulation, fed in chunks of
columns by one matrix product each. Width decides the path (docs/design.md): while ``m`` is
well below the layer's size, the factored re-factorisation costs
``O((d_out + d_in) m^2)`` and wins by orders of magnitude; past it the stacked factors are
larger than the layer, the ``m x m`` Gram matrices turn singular, and a dense sum is both
exact and cheaper. Memory is bounded by the layer's size, whatever the number of clients.

Dense products in float32 (``products="float32"``): each chunk's product is computed in
float32 and summed into the float64 matrix, and the top-``r`` Lanczos multiplies by a
float32 copy. The float64 GEMM is what a large layer's dense sum costs (K = 1000 rank-16
clients of a 4096 x 4096 layer: 537 GFlop, 5.3 s of a 9.8 s round on 2 cores); float32
halves it, at about 3e-7 relative error in the sum and 1e-6 in its top-r product
(``docs/benchmarks.md``): a few float32 roundings of the arrays the clients sent and
receive. :class:`~fedlowrank.aggregation.round.RoundConfig` picks it for layers of
:data:`FLOAT32_PRODUCTS_ENTRIES` entries or more.

:func:`top_rank` reads the best rank-``r`` approximation of ``M`` off either form, with
what the rank could not hold (its exact norm, and the residual itself for ``carry``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .ranks import Factors
from .linalg import complete_basis, orthonormal_range, small_lapack


PRODUCT_PRECISIONS = ("float64", "float32")

FLOAT32_PRODUCTS_ENTRIES = 2**22
"""Layers of at least this many entries (2048 x 2048, 4096 x 1024) take float32 dense
products by default: there a float64 dense sum costs seconds a round, below it
milliseconds (and the experiments' layers keep float64's bits)."""


class WeightedSum:
    """``M_g`` for every group, streamed; see the module docstring.

    Parameters
    ----------
    d_out, d_in : int
        Layer shape.
    groups : int (default: 1)
        Rows of ``S`` (G).
    dtype : torch.dtype (default: torch.float64)
        Accumulation dtype.
    dense_above : int, optional
        Stacked width beyond which the sum turns dense (default ``min(d_out, d_in) // 2``;
        0 makes it dense from the start, a huge value keeps it factored).
    chunk : int, optional
        Columns buffered before one dense update (dense mode); default 256, 2048 with
        float32 products (fewer float64 additions of the whole matrix).
    products : {"float64", "float32"} (default: "float64")
        Precision of each dense chunk's product (see the module docstring); the sum is
        float64 either way.
    """

    def __init__(
        self,
        d_out: int,
        d_in: int,
        groups: int = 1,
        dtype: torch.dtype = torch.float64,
        dense_above: int | None = None,
        chunk: int | None = None,
        products: str = "float64",
    ) -> None:
        if products not in PRODUCT_PRECISIONS:
            raise ValueError(f"products must be one of {PRODUCT_PRECISIONS}, got {products!r}")
        self.d_out, self.d_in, self.groups, self.dtype = d_out, d_in, groups, dtype
        self.dense_above = min(d_out, d_in) // 2 if dense_above is None else dense_above
        self.products = products
        self.chunk = chunk or (2048 if products == "float32" else 256)
        self.total = torch.zeros(groups, dtype=torch.float64)
        self.clients = 0
        self._raw: list[Factors] = []  # weighted by raw weights, normalised by ``total`` at the end
        self._unit: list[Factors] = []  # already normalised
        self._width = 0
        self._dense_raw: torch.Tensor | None = None
        self._dense_unit: torch.Tensor | None = None

    @property
    def dense(self) -> bool:
        """Whether the sum is held as dense matrices."""
        return self._dense_raw is not None

    @property
    def width(self) -> int:
        """Columns stacked so far (factored mode), or buffered (dense mode)."""
        return self._width

    def add(self, factors: Factors, weight: torch.Tensor | float, count: bool = True) -> None:
        """Fold in one client's factors with its raw weight (scalar, or one per group).

        ``count=False`` adds a term at a client's weight without counting that weight
        again (the global tail completing a lower-rank client's reply).
        """
        w = torch.as_tensor(weight, dtype=torch.float64).reshape(-1).expand(self.groups)
        if count:
            self.count(w)
        self._push(self._raw, Factors(factors.u, w.to(self.dtype)[:, None] * factors.s.to(self.dtype), factors.v))

    def count(self, weight: torch.Tensor | float) -> None:
        """Count one client at ``weight`` (scalar or per group) in the normalisation."""
        self.total += torch.as_tensor(weight, dtype=torch.float64).reshape(-1).expand(self.groups)
        self.clients += 1

    def add_normalised(self, term: Factors | torch.Tensor) -> None:
        """Add a term as it is (not divided by the total weight): e.g. a carried residual.

        ``term`` is factors, or a dense ``(G x d_out x d_in)`` tensor (turns the sum dense).
        """
        if isinstance(term, torch.Tensor):
            self._to_dense()
            self._dense_unit += term.to(self.dtype)
            return
        self._push(self._unit, term)

    def _push(self, bucket: list[Factors], f: Factors) -> None:
        # Dense with float32 products: buffer in float32 (half the bytes to stack, no cast at the flush).
        dtype = torch.float32 if self.dense and self.products == "float32" else self.dtype
        bucket.append(Factors(f.u.to(dtype), f.s.to(dtype), f.v.to(dtype)))
        self._width += f.u.shape[1]
        if self.dense:
            if self._width >= self.chunk:
                self._flush()
        elif self._width > self.dense_above:
            self._to_dense()

    def _to_dense(self) -> None:
        if self.dense:
            return
        shape = (self.groups, self.d_out, self.d_in)
        self._dense_raw = torch.zeros(shape, dtype=self.dtype)
        self._dense_unit = torch.zeros(shape, dtype=self.dtype)
        self._flush()

    def _flush(self) -> None:
        """Move the buffered columns into the dense sums (one product per group)."""
        for bucket, dense in ((self._raw, self._dense_raw), (self._unit, self._dense_unit)):
            if bucket:
                f = _stack(bucket)
                for g in range(self.groups):
                    if self.products == "float32":
                        dense[g] += (f.u * f.s[g]).float() @ f.v.float().T
                    else:
                        dense[g].addmm_(f.u * f.s[g], f.v.T)
                bucket.clear()
        self._width = 0

    def _scale(self) -> torch.Tensor:
        """Per group ``1 / total`` (0 for a group no client weighted)."""
        return torch.where(self.total > 0, 1.0 / self.total.clamp_min(1e-300), torch.zeros_like(self.total))

    def stacked(self) -> Factors:
        """Factored mode: ``M_g = A diag(D[g]) B^T`` as ``Factors(A, D, B)``, normalised."""
        if self.dense:
            raise RuntimeError("the sum is dense; use matrices()")
        scale = self._scale().to(self.dtype)[:, None]
        parts = [Factors(f.u, f.s * scale, f.v) for f in self._raw] + list(self._unit)
        if not parts:
            empty = torch.zeros(0, dtype=self.dtype)
            return Factors(empty.reshape(self.d_out, 0), empty.reshape(self.groups, 0), empty.reshape(self.d_in, 0))
        return _stack(parts)

    def matrices(self) -> torch.Tensor:
        """``M`` as a dense ``(G x d_out x d_in)`` tensor, normalised (forms it if factored)."""
        if not self.dense:
            f = self.stacked()
            return torch.einsum("ar,gr,br->gab", f.u, f.s, f.v)
        self._flush()
        return self._dense_raw * self._scale().to(self.dtype)[:, None, None] + self._dense_unit

    def distance(self, approx: Factors) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||M_g - approx_g||, ||M_g||)`` per group, without forming ``M`` if factored.

        Factored: ``||A diag(d) B^T||^2 = d^T ((A^T A) * (B^T B)) d`` on the stack
        ``[A, u]``, ``[D, -s]``, ``[B, v]``.
        """
        if self.dense:
            m = self.matrices()
            diff = m - torch.einsum("ar,gr,br->gab", approx.u.to(self.dtype), approx.s.to(self.dtype), approx.v.to(self.dtype))
            return diff.flatten(1).norm(dim=1), m.flatten(1).norm(dim=1)
        f = self.stacked()
        a = torch.cat([f.u, approx.u.to(self.dtype)], dim=1)
        b = torch.cat([f.v, approx.v.to(self.dtype)], dim=1)
        kernel = (a.T @ a) * (b.T @ b)
        width = f.u.shape[1]
        diff = torch.cat([f.s, -approx.s.to(self.dtype)], dim=1)
        target = diff[:, :width]
        sq = lambda d, k: ((d @ k) * d).sum(dim=1).clamp_min(0).sqrt()  # noqa: E731
        return sq(diff, kernel), sq(target, kernel[:width, :width])


def _stack(parts: list[Factors]) -> Factors:
    return Factors(
        torch.cat([p.u for p in parts], dim=1),
        torch.cat([p.s for p in parts], dim=1),
        torch.cat([p.v for p in parts], dim=1),
    )


class TopRank(NamedTuple):
    """Best rank-``r`` approximation of one (G = 1) sum and what it could not hold."""

    factors: Factors
    """Orthonormal ``u, v``, ``s`` (1 x r) descending; zero-padded to rank ``r``."""
    truncated_norm: torch.Tensor
    """``||M - u diag(s) v^T||``."""
    target_norm: torch.Tensor
    """``||M||``."""
    residual: Factors | torch.Tensor | None
    """``M - u diag(s) v^T`` (factors, or dense ``1 x d_out x d_in``) if asked for."""


def top_rank(acc: WeightedSum, rank: int, method: str = "gram", residual: bool = False) -> TopRank:
    """The exact best rank-``rank`` approximation of a G = 1 :class:`WeightedSum`."""
    if acc.groups != 1:
        raise ValueError(f"top_rank takes a G = 1 sum, got G = {acc.groups}")
    if acc.dense:
        m = acc.matrices()[0]
        u, s, v = dense_top(m, rank, products=acc.products)
        approx = Factors(u, s[None, :], v)
        rest = m - (u * s) @ v.T
        out = _pad(approx, rank)
        return TopRank(out, rest.norm(), m.norm(), rest[None] if residual else None)
    f = acc.stacked()
    if f.u.shape[1] == 0:
        zero = torch.zeros((), dtype=acc.dtype)
        return TopRank(_pad(f, rank), zero, zero, f if residual else None)
    q_u, r_u = orthonormal_range(f.u, method)
    q_v, r_v = orthonormal_range(f.v, method)
    core = (r_u * f.s[0].to(r_u.dtype)) @ r_v.T
    x, sigma, y = _core_triplets(core)
    keep = min(rank, sigma.shape[0])
    dtype = acc.dtype
    u, v = q_u @ x.to(dtype), q_v @ y.to(dtype)
    sigma = sigma.to(dtype)
    approx = Factors(u[:, :keep], sigma[None, :keep], v[:, :keep])
    tail = Factors(u[:, keep:], sigma[None, keep:], v[:, keep:])
    truncated = sigma[keep:].square().sum().sqrt()
    return TopRank(_pad(approx, rank), truncated, sigma.square().sum().sqrt(), tail if residual else None)


def compact(acc: WeightedSum, method: str = "gram") -> Factors:
    """A G = 1 sum exactly, as its non-zero singular triplets (rank at most ``min(d_out, d_in)``).

    How the server keeps a folded base correction bounded by the layer's size however many
    rounds add to it.
    """
    if acc.dense:
        m = acc.matrices()[0]
        u, s, v_t = torch.linalg.svd(m, full_matrices=False)
        keep = int((s > s[0].clamp_min(torch.finfo(s.dtype).tiny) * torch.finfo(s.dtype).eps * max(m.shape)).sum()) if s.numel() else 0
        return Factors(u[:, :keep], s[None, :keep], v_t[:keep].T)
    f = acc.stacked()
    if f.u.shape[1] == 0:
        return f
    q_u, r_u = orthonormal_range(f.u, method)
    q_v, r_v = orthonormal_range(f.v, method)
    x, sigma, y = _core_triplets((r_u * f.s[0].to(r_u.dtype)) @ r_v.T)
    return Factors(q_u @ x.to(acc.dtype), sigma[None, :].to(acc.dtype), q_v @ y.to(acc.dtype))


def _core_triplets(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every non-zero singular triplet of a small core, in float64, descending.

    From the eigendecomposition of ``core core^T``: several times faster than an SVD on
    CPU; the leading triplets are accurate to rounding of the largest, the tail's values
    (used for its norm and the carried residual) accurate in absolute terms.
    """
    wide = core.double()
    if wide.numel() == 0:  # every client's factors were zero (e.g. an untouched LoRA init)
        return wide.new_zeros(wide.shape[0], 0), wide.new_zeros(0), wide.new_zeros(wide.shape[1], 0)
    with small_lapack():
        evals, evecs = torch.linalg.eigh(wide @ wide.T)
    evals, evecs = evals.flip(0), evecs.flip(1)
    eps = torch.finfo(torch.float64).eps
    nonzero = evals > evals[0].clamp_min(0) * eps * evals.shape[0]
    if not bool(nonzero.any()):
        return evecs[:, :0], evals[:0], wide.new_zeros(wide.shape[1], 0)
    count = int(nonzero.sum())
    sigma = evals[:count].sqrt()
    x = evecs[:, :count]
    y = (wide.T @ x) / sigma
    return x, sigma, y


def _pad(f: Factors, rank: int) -> Factors:
    """Zero singular values (and orthonormal completions) up to ``rank`` columns."""
    missing = rank - f.u.shape[1]
    if missing <= 0:
        return f.columns(slice(0, rank))
    u = complete_basis(f.u, rank)
    v = complete_basis(f.v, rank)
    s = torch.cat([f.s, f.s.new_zeros(f.s.shape[0], missing)], dim=1)
    return Factors(u, s, v)


def dense_top(
    m: torch.Tensor, rank: int, max_iter: int = 100, seed: int = 0, products: str = "float64"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``rank`` singular triplets of a dense matrix, to rounding.

    Block subspace iteration (``rank + max(rank, 8)`` columns) until every Ritz triplet's
    residual ``||M v_j - s_j u_j||`` is below ``0.1 sqrt(eps) ||M||_2``. It converges at
    ``(s_width / s_rank)^2`` per sweep: in a few sweeps where the spectrum has a gap (many
    clients sharing directions), in hundreds where it is flat (independent clients, DP
    noise). After each sweep that rate is estimated from the Ritz values, and where it
    predicts more than :data:`LANCZOS_SWEEPS` further sweeps (or more than ``max_iter``
    allows), the top triplets come from implicitly
    restarted Lanczos instead (:func:`lanczos_top`), whose cost grows with the square root
    of the inverse gap. Measured at d = 4096, K = 256 independent rank-16 clients, one
    thread: 83 s for 100 futile sweeps plus the Gram eigendecomposition before, 4.4 s by
    Lanczos (``docs/benchmarks.md``). ``products="float32"``: Lanczos multiplies by a
    float32 copy (a sum with float32 products is no more accurate than that).
    """
    d_out, d_in = m.shape
    width = min(rank + max(rank, 8), d_out, d_in)
    gen = torch.Generator(device=m.device).manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d_in, width, generator=gen, dtype=m.dtype, device=m.device))[0]
    tol = 0.1 * torch.finfo(m.dtype).eps ** 0.5
    for sweep in range(1, max_iter + 1):
        q_u = torch.linalg.qr(m @ q)[0]
        q, r = torch.linalg.qr(m.T @ q_u)  # q_u^T M = r^T q^T, so q_u^T M q = r^T
        with small_lapack():
            x, sigma, y_t = torch.linalg.svd(r.T)
        u, v, s = q_u @ x[:, :rank], q @ y_t[:rank].T, sigma[:rank]
        scale = float(sigma[0].clamp_min(torch.finfo(m.dtype).tiny))
        residual = float((m @ v - u * s).norm(dim=0).max())
        if residual <= tol * scale:
            return u, s, v
        if width > rank and _sweeps_needed(sigma, rank, residual, tol * scale) > min(LANCZOS_SWEEPS, max_iter - sweep):
            break
    return lanczos_top(m, rank, seed, products)


LANCZOS_SWEEPS = 10
"""Subspace iteration goes on only while it is predicted to converge within this many more
sweeps: one sweep is ``2 x width`` matrix-vector products, about what Lanczos needs in all
on a flat spectrum (ARPACK, ``k = 16``: a few hundred)."""


def _sweeps_needed(sigma: torch.Tensor, rank: int, residual: float, target: float) -> float:
    """Sweeps subspace iteration still needs at its estimated rate ``(s_width / s_rank)^2``."""
    rate = float((sigma[-1] / sigma[rank - 1].clamp_min(torch.finfo(sigma.dtype).tiny)) ** 2)
    if rate >= 1.0 - 1e-12:
        return math.inf
    return math.log(target / residual) / math.log(rate) if residual > target else 0.0


def lanczos_top(
    m: torch.Tensor, rank: int, seed: int = 0, products: str = "float64"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``rank`` singular triplets by implicitly restarted Lanczos (ARPACK, ``scipy.sparse.linalg.svds``).

    Used by :func:`dense_top` where the spectrum is too flat for subspace iteration; on the
    CPU in float64, seeded start vector; ``products="float32"`` multiplies by a float32
    copy (memory-bound products at half the bytes: 1.1 s instead of 2.6 s at d = 4096,
    K = 1000) and stops at float32's accuracy. Where ARPACK does not converge (or ``rank``
    is the whole matrix) it takes the full SVD: exact, ``O(d^3)``.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, svds  # imported where needed: a second or so

    d_out, d_in = m.shape
    wide = m.detach().to("cpu", torch.float64)
    if rank < min(d_out, d_in) - 1:
        start = torch.randn(min(d_out, d_in), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        operator, tol = wide.numpy(), 0.0
        if products == "float32":
            narrow = wide.numpy().astype(np.float32)
            operator = LinearOperator(
                narrow.shape, dtype=np.float64,
                matvec=lambda x: (narrow @ x.astype(np.float32)).astype(np.float64),
                rmatvec=lambda x: (narrow.T @ x.astype(np.float32)).astype(np.float64),
            )
            tol = 1e-6
        try:
            u, s, v_t = svds(operator, k=rank, v0=start.numpy(), solver="arpack", tol=tol)
            order = s.argsort()[::-1].copy()
            u, s, v = (torch.from_numpy(a.copy()) for a in (u[:, order], s[order], v_t[order].T))
            return u.to(m), s.to(m), v.to(m)
        except ArpackNoConvergence:
            pass
    with small_lapack():
        u, s, v_t = torch.linalg.svd(wide, full_matrices=False)
    return u[:, :rank].to(m), s[:rank].to(m), v_t[:rank].T.to(m)
