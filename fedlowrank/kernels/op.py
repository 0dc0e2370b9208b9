"""The grouped low-rank op: input checks, path choice, and the Triton autograd Function.

``y = x W0^T + b + scale * ((x V) * S_row) U^T`` with ``S_row = group_weights @ S``
per sample. Two entry points:

* :func:`lowrank_delta` - the adapter alone (what :class:`~fedlowrank.adapters.SVDLinear`
  adds to its frozen base);
* :func:`lowrank_linear` - the whole layer, the expand accumulated into the base output.

Both go through one autograd Function with a hand-written backward whose two
primitives (shrink, expand) run as Triton kernels on CUDA tensors when Triton
imports (:mod:`fedlowrank.kernels.triton_lowrank`), else as torch BLAS calls
(:mod:`fedlowrank.kernels.reference`); plain torch autograd (the reference) is used
under functorch transforms. :func:`kernel_backend` says which path runs; ``backend=``
or the ``FEDLOWRANK_KERNEL_BACKEND`` environment variable
(``auto`` | ``triton`` | ``torch`` | ``reference``) forces one. All checks raise ``ValueError``
before any kernel launches.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .reference import reference_delta, reference_linear

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "FEDLOWRANK_KERNEL_BACKEND"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreter_on() -> bool:
    # Triton's CPU interpreter runs kernels on CPU tensors (tests without a GPU).
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_backend(x: torch.Tensor | None = None, backend: str | None = None) -> str:
    """Say which path runs for an input: ``"triton"``, ``"torch"`` or ``"reference"``.

    ``"triton"`` and ``"torch"`` share one autograd Function with a hand-written
    backward (rank-r intermediates only, expand accumulated in place); ``"triton"``
    runs its primitives as Triton kernels, ``"torch"`` as BLAS calls.
    ``"reference"`` is plain torch autograd, used under functorch transforms (vmap
    for Opacus per-sample gradients), which cannot batch the Function.

    Parameters
    ----------
    x : torch.Tensor, optional
        The input the op would get (its device decides). Without it, the answer is
        for a CUDA tensor when CUDA is available, else for a CPU tensor.
    backend : str, optional
        ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``; defaults to the
        ``FEDLOWRANK_KERNEL_BACKEND`` environment variable, else ``"auto"`` (Triton for
        CUDA tensors when triton imports, else torch).

    Returns
    -------
    str
        The path name.

    Raises
    ------
    ValueError
        On an unknown backend name, or ``"triton"`` forced where it cannot run
        (Triton missing, or a CPU tensor without ``TRITON_INTERPRET=1``).
    """
    choice = (backend or os.environ.get(ENV_VAR) or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {choice!r}")
    if choice in ("reference", "torch"):
        return choice
    on_cuda = x.is_cuda if x is not None else torch.cuda.is_available()
    if choice == "triton":
        if not (_triton_importable() and (on_cuda or _interpreter_on())):
            raise ValueError(
                "the Triton backend needs triton installed and a CUDA tensor "
                "(or TRITON_INTERPRET=1 for CPU tensors)"
            )
        return "triton"
    if torch._C._are_functorch_transforms_active():
        return "reference"
    return "triton" if (on_cuda and _triton_importable()) else "torch"


def _check_factors(
    x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor
) -> tuple[int, int, int, int]:
    for name, t in (("x", x), ("U", U), ("S", S), ("V", V)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d_in)")
    if U.dim() != 2 or V.dim() != 2:
        raise ValueError(
            f"U and V must be 2-D (d_out, r) and (d_in, r), got shapes "
            f"{tuple(U.shape)} and {tuple(V.shape)}"
        )
    (d_out, rank), (d_in, rank_v) = U.shape, V.shape
    if rank != rank_v:
        raise ValueError(f"U has rank {rank} but V has rank {rank_v}")
    if not 1 <= rank <= min(d_in, d_out):
        raise ValueError(
            f"rank {rank} must be between 1 and min(d_in, d_out) = {min(d_in, d_out)} "
            f"for a {d_in}->{d_out} adapter"
        )
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but V expects d_in = {d_in}")
    if S.dim() not in (1, 2) or S.shape[-1] != rank:
        raise ValueError(f"S must be (G, r) or (r,) with r = {rank}, got {tuple(S.shape)}")
    groups = 1 if S.dim() == 1 else S.shape[0]
    return d_in, d_out, rank, groups


def _row_singular_values(
    S: torch.Tensor, group_weights: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Per-sample singular values, (batch, r) or (1, r) when every row shares them.

    Computed in float32 (float64 for float64 S) with torch, a tiny batch x G x r
    product, so that autograd carries ``dS = group_weights^T @ ds_sample`` from the
    per-sample gradient.
    """
    S2 = S if S.dim() == 2 else S[None, :]
    groups = S2.shape[0]
    acc_dtype = torch.promote_types(S.dtype, torch.float32)
    S32 = S2.to(acc_dtype)
    if group_weights is None:
        if groups != 1:
            raise ValueError(
                f"S has G = {groups} groups: pass group_weights as (batch, G) floats, "
                "(batch,) integer ids or one (G,) mix for every row"
            )
        return S32
    w = group_weights
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"group_weights must be a torch.Tensor, got {type(w).__name__}")
    w = w.to(S.device)
    if w.dtype == torch.bool or w.is_complex():
        raise ValueError(
            f"group_weights must be float (batch, G) weights or integer (batch,) ids, "
            f"got dtype {w.dtype}"
        )
    if not w.dtype.is_floating_point:
        if w.dim() != 1 or w.shape[0] != batch:
            raise ValueError(
                f"integer group ids must have shape ({batch},) for this batch, got "
                f"{tuple(w.shape)}"
            )
        # Under vmap (per-sample gradients) the ids cannot be read; indexing still
        # fails loudly on an out-of-range id there.
        in_transform = torch._C._are_functorch_transforms_active()
        if batch and not in_transform and (int(w.min()) < 0 or int(w.max()) >= groups):
            raise ValueError(
                f"group ids must be in 0..{groups - 1}; map unknown groups to weights "
                "with fedlowrank.adapters.group_weights_from_ids"
            )
        return S32[w.long()]
    if w.dim() == 1 and w.shape[0] == groups:
        return (w.to(acc_dtype) @ S32)[None, :]
    if w.dim() != 2 or tuple(w.shape) != (batch, groups):
        raise ValueError(
            f"group weights have shape {tuple(w.shape)}, expected ({batch}, {groups}) "
            f"for this batch (batch, G) or ({groups},) for one mix"
        )
    return w.to(acc_dtype) @ S32


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    # Rows are sample-major: dim 0 is the batch, middle dims (a sequence) share a group.
    batch = x.shape[0] if x.dim() >= 2 else 1
    return x.reshape(-1, x.shape[-1]), batch


def _kernel_rows(s_rows: torch.Tensor, rows: int) -> torch.Tensor:
    # One shared row: a stride-0 view gives every row its values without a copy.
    return s_rows if s_rows.shape[0] > 1 else s_rows.expand(rows, -1)


def _kernel_module(name: str):
    if name == "triton":
        from . import triton_lowrank

        return triton_lowrank
    from . import reference

    return reference


class _LowRankFunction(torch.autograd.Function):
    """Fused forward and hand-written backward over two primitives (shrink, expand).

    ``kernels`` picks their implementation: ``"triton"`` or ``"torch"`` (BLAS calls).
    Saves ``x``, the factors and the rank-r ``h`` (float32) and ``z``; never forms dW.
    """

    @staticmethod
    def forward(ctx, x2, U, V, s_rows, weight, bias, scale, rows_per_sample, kernels):
        tk = _kernel_module(kernels)

        M, rank = x2.shape[0], U.shape[1]
        srow = _kernel_rows(s_rows, M)
        # Accumulate in float32 (float64 for float64 inputs on the torch path).
        acc_dtype = torch.promote_types(x2.dtype, torch.float32)
        h = torch.empty(M, rank, device=x2.device, dtype=acc_dtype)
        z = torch.empty(M, rank, device=x2.device, dtype=x2.dtype)
        tk.skinny(
            x2, V, h, alpha=scale, epilogue=tk.SHRINK, out2=z, srow=srow,
            rows_per_sample=rows_per_sample,
        )
        if weight is None:
            out = torch.empty(M, U.shape[0], device=x2.device, dtype=x2.dtype)
        else:
            out = F.linear(x2, weight, bias).contiguous()
        tk.expand(z, U, out, accumulate=weight is not None)
        ctx.save_for_backward(x2, U, V, s_rows, weight, h, z)
        ctx.scale = scale
        ctx.rows_per_sample = rows_per_sample
        ctx.kernels = kernels
        return out

    @staticmethod
    def backward(ctx, grad):
        tk = _kernel_module(ctx.kernels)

        x2, U, V, s_rows, weight, h, z = ctx.saved_tensors
        need_x, need_u, need_v, need_s, need_w, need_b = ctx.needs_input_grad[:6]
        M, rank = h.shape
        dx = dU = dV = ds = dW = db = None
        if need_x or need_v or need_s:
            dh = torch.empty(M, rank, device=x2.device, dtype=x2.dtype)
            ds_row = torch.empty(M, rank, device=x2.device, dtype=h.dtype)
            tk.skinny(
                grad, U, dh, alpha=ctx.scale, epilogue=tk.GRAD, out2=ds_row,
                srow=_kernel_rows(s_rows, M),
                h=h, rows_per_sample=ctx.rows_per_sample,
            )
            if need_x:
                if weight is None:
                    dx = torch.empty_like(x2)
                else:
                    dx = (grad @ weight).contiguous()
                tk.expand(dh, V, dx, accumulate=weight is not None)
            if need_v:
                dV32 = torch.zeros(V.shape, device=V.device, dtype=h.dtype)
                tk.skinny(x2.T, dh, dV32)
                dV = dV32.to(V.dtype)
            if need_s:
                if s_rows.shape[0] == 1:
                    ds = ds_row.sum(0, keepdim=True)
                else:
                    ds = ds_row.view(s_rows.shape[0], -1, rank).sum(1)
                ds = ds.to(s_rows.dtype)
        if need_u:
            dU32 = torch.zeros(U.shape, device=U.device, dtype=h.dtype)
            tk.skinny(grad.T, z, dU32)
            dU = dU32.to(U.dtype)
        # The frozen base's own gradients, only if someone trains it (dense baseline).
        if need_w:
            dW = grad.T @ x2
        if need_b:
            db = grad.sum(0)
        return dx, dU, dV, ds, dW, db, None, None, None


def _run(x, U, S, V, scale, group_weights, weight, bias, backend):
    d_in, d_out, _, _ = _check_factors(x, U, S, V)
    if weight is not None:
        if tuple(weight.shape) != (d_out, d_in):
            raise ValueError(
                f"base weight must be ({d_out}, {d_in}) to match U and V, got "
                f"{tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias must be ({d_out},), got {tuple(bias.shape)}")
    x2, batch = _flatten(x)
    s_rows = _row_singular_values(S, group_weights, batch)
    # Factors follow the input's dtype (as autocast would); autograd casts grads back.
    dtype = x.dtype
    U, V = U.to(dtype), V.to(dtype)
    if weight is not None:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    path = kernel_backend(x, backend)
    if path == "triton" and dtype not in _TRITON_DTYPES:
        if (backend or os.environ.get(ENV_VAR) or "auto").lower() == "triton":
            raise ValueError(f"the Triton path takes float32/float16/bfloat16, got {dtype}")
        path = "torch"
    if path == "reference" or x2.shape[0] == 0:  # nothing to launch for an empty batch
        if weight is None:
            out = reference_delta(x2, U, s_rows, V, scale)
        else:
            out = reference_linear(x2, weight, bias, U, s_rows, V, scale)
    else:
        rows_per_sample = x2.shape[0] // batch if s_rows.shape[0] > 1 else 1
        out = _LowRankFunction.apply(
            x2, U, V, s_rows, weight, bias, float(scale), rows_per_sample, path
        )
    return out.reshape(*x.shape[:-1], d_out)


def lowrank_delta(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    scale: float,
    group_weights: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Adapter output ``scale * ((x V) * S_row) U^T`` without forming ``U diag(S) V^T``.

    Parameters
    ----------
    x : torch.Tensor
        Input (batch, ..., d_in). Middle dimensions (a sequence) share their sample's
        group.
    U : torch.Tensor
        (d_out, r).
    S : torch.Tensor
        Singular values per group (G, r), or (r,) for G = 1.
    V : torch.Tensor
        (d_in, r).
    scale : float
        LoRA scale ``alpha / r``.
    group_weights : torch.Tensor, optional
        Which row of ``S`` each sample uses: float (batch, G) weights (one-hot for hard
        ids, any mix for soft assignment), integer (batch,) ids in ``0..G-1``, or one
        float (G,) mix for every row. May be None only when G = 1.
    backend : str, optional
        ``"auto"`` (default), ``"triton"``, ``"torch"`` or ``"reference"``; see
        :func:`kernel_backend`.

    Returns
    -------
    torch.Tensor
        (batch, ..., d_out), differentiable in ``x``, ``U``, ``S``, ``V`` (and float
        ``group_weights``).

    Raises
    ------
    ValueError
        On shapes that do not agree, a rank above ``min(d_in, d_out)``, group weights
        or ids of the wrong length, dtype or range.
    """
    return _run(x, U, S, V, scale, group_weights, None, None, backend)


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    scale: float,
    group_weights: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Whole adapted layer ``x W0^T + b + scale * ((x V) * S_row) U^T``.

    The expand is accumulated into the base output (and, backward, ``dh V^T`` into
    ``g W0``), so the adapter adds no d_out-wide temporary. ``weight`` (d_out, d_in)
    and ``bias`` (d_out,) are normally frozen; if they require grad their dense
    gradients are computed too (the full fine-tuning baseline). Other parameters as
    in :func:`lowrank_delta`.
    """
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    return _run(x, U, S, V, scale, group_weights, weight, bias, backend)
