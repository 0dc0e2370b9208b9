"""Triton kernels for the grouped low-rank op (shrink, expand, and their gradients).

Two kernels cover the forward and the backward:

``skinny``
    ``C (P x r) = A (P x Q) @ B (Q x r)`` with float32 accumulation. ``A`` is read
    through strides, so ``x^T`` and ``g^T`` cost nothing. Epilogues fuse the per-row
    group scale into the shrink (``h = x V``, ``z = h * s_row * scale``) and into the
    gradient shrink (``dh = (g U) * s_row * scale``, ``ds_row = (g U) * h * scale``).
    When the reduction dimension is long and ``P`` short (``dU = g^T z``, ``dV = x^T dh``)
    the reduction is split over programs that add into a float32 output atomically.
``expand``
    ``C (M x N) (+)= A (M x r) @ B (N x r)^T``, optionally accumulating into ``C`` so
    the adapter lands in the base output (forward) or in ``g W0`` (backward) without
    another M x N temporary.

Nothing here forms a d_out x d_in matrix. Import this module only after deciding the
Triton path runs: ``triton.jit`` reads ``TRITON_INTERPRET`` when the kernels are
decorated, so tests that use the CPU interpreter must set it before the import.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Epilogue codes for the skinny kernel.
PLAIN = 0
"""``out1 = alpha * acc`` (atomically added when the reduction is split)."""
SHRINK = 1
"""``out1 = acc`` (h, float32), ``out2 = alpha * acc * s_row`` (z)."""
GRAD = 2
"""``out1 = alpha * acc * s_row`` (dh), ``out2 = alpha * acc * h`` (ds_row, float32)."""


@triton.jit
def _skinny_kernel(
    a_ptr, b_ptr, out1_ptr, out2_ptr, srow_ptr, h_ptr,
    P, Q, R, q_per_split, rows_per_sample, alpha,
    stride_ap, stride_aq, stride_bq, stride_br,
    stride_o1p, stride_o1r, stride_o2p, stride_o2r,
    stride_sb, stride_sr, stride_hp, stride_hr,
    EPILOGUE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    # int64 offsets: tokens x d can pass 2**31 elements on a large batch.
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_r = offs_r < R
    q_start = pid_s * q_per_split
    q_end = tl.minimum(q_start + q_per_split, Q)

    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_Q):
        offs_q = (q0 + tl.arange(0, BLOCK_Q)).to(tl.int64)
        mask_q = offs_q < q_end
        a = tl.load(
            a_ptr + offs_p[:, None] * stride_ap + offs_q[None, :] * stride_aq,
            mask=mask_p[:, None] & mask_q[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + offs_q[:, None] * stride_bq + offs_r[None, :] * stride_br,
            mask=mask_q[:, None] & mask_r[None, :], other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask = mask_p[:, None] & mask_r[None, :]
    out1 = out1_ptr + offs_p[:, None] * stride_o1p + offs_r[None, :] * stride_o1r
    if EPILOGUE == 0:
        if SPLIT:
            tl.atomic_add(out1, acc * alpha, mask=mask)
        else:
            tl.store(out1, (acc * alpha).to(out1_ptr.dtype.element_ty), mask=mask)
    else:
        # Rows of one sample (a sequence) share that sample's singular values.
        sample = offs_p // rows_per_sample
        s = tl.load(
            srow_ptr + sample[:, None] * stride_sb + offs_r[None, :] * stride_sr,
            mask=mask, other=0.0,
        ).to(tl.float32)
        out2 = out2_ptr + offs_p[:, None] * stride_o2p + offs_r[None, :] * stride_o2r
        if EPILOGUE == 1:
            tl.store(out1, acc.to(out1_ptr.dtype.element_ty), mask=mask)
            tl.store(out2, (acc * s * alpha).to(out2_ptr.dtype.element_ty), mask=mask)
        else:
            h = tl.load(
                h_ptr + offs_p[:, None] * stride_hp + offs_r[None, :] * stride_hr,
                mask=mask, other=0.0,
            ).to(tl.float32)
            tl.store(out1, (acc * s * alpha).to(out1_ptr.dtype.element_ty), mask=mask)
            tl.store(out2, (acc * h * alpha).to(out2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expand_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, R,
    stride_am, stride_ar, stride_bn, stride_br, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )
        # B is (N x r); load it as an r x N tile to multiply by its transpose.
        b = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
            mask=mask_n[None, :] & mask_r[:, None], other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c, mask=mask, other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)


# Triton's CPU interpreter multiplies 16-bit tiles as raw bits (wrong results), so
# there the tiles go to float32 before tl.dot; compiled kernels use native bf16/fp16.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _rank_block(rank: int) -> int:
    # tl.dot needs every tile side >= 16; 64 keeps registers bounded for large ranks.
    return max(16, min(64, triton.next_power_of_2(rank)))


def _dot_precision(dtype: torch.dtype) -> str:
    # Follow torch's own matmul setting so fp32 results match what a user expects.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # CPU interpreter: a few splits so tests cover the atomic path.
    return 8


def skinny(
    a: torch.Tensor,
    b: torch.Tensor,
    out1: torch.Tensor,
    *,
    alpha: float = 1.0,
    epilogue: int = PLAIN,
    out2: torch.Tensor | None = None,
    srow: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    rows_per_sample: int = 1,
    splits: int | None = None,
) -> None:
    """Launch ``out1 (P x r) <- epilogue(a (P x Q) @ b (Q x r))``.

    Parameters
    ----------
    a, b : torch.Tensor
        2-D operands of one dtype, any strides.
    out1 : torch.Tensor
        Output (P x r). For ``PLAIN`` with ``splits > 1`` it must be float32 and zeroed.
    alpha : float
        Scale applied in the epilogue.
    epilogue : int
        ``PLAIN``, ``SHRINK`` or ``GRAD`` (see the module constants).
    out2, srow, h : torch.Tensor, optional
        Second output, per-sample singular values (batch x r) and the saved shrink
        ``h`` (P x r), as the epilogue needs them.
    rows_per_sample : int
        Rows of ``a`` that share one row of ``srow``.
    splits : int, optional
        Programs sharing one reduction (``PLAIN`` only); chosen from the device if None.
    """
    P, Q = a.shape
    R = b.shape[1]
    block_p, block_q, block_r = 64, 64, _rank_block(R)
    p_tiles, r_tiles = triton.cdiv(P, block_p), triton.cdiv(R, block_r)
    if epilogue != PLAIN:
        splits = 1
    elif splits is None:
        wanted = triton.cdiv(_target_programs(a.device), p_tiles * r_tiles)
        # On a GPU each split should still stream several tiles; the interpreter
        # splits as soon as it can so small test shapes cover the atomic path.
        chunk = 4 * block_q if a.is_cuda else block_q
        splits = max(1, min(wanted, triton.cdiv(Q, chunk)))
    q_per_split = triton.cdiv(triton.cdiv(Q, splits), block_q) * block_q
    splits = triton.cdiv(Q, q_per_split) if Q else 1
    if splits > 1 and out1.dtype != torch.float32:
        raise ValueError("a split reduction needs a float32, zeroed output")
    dummy = out1
    out2_ = out2 if out2 is not None else dummy
    srow_ = srow if srow is not None else dummy
    h_ = h if h is not None else dummy
    grid = (p_tiles, splits, r_tiles)
    _skinny_kernel[grid](
        a, b, out1, out2_, srow_, h_,
        P, Q, R, q_per_split, rows_per_sample, float(alpha),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out1.stride(0), out1.stride(1), out2_.stride(0), out2_.stride(1),
        srow_.stride(0), srow_.stride(1), h_.stride(0), h_.stride(1),
        EPILOGUE=epilogue, SPLIT=splits > 1,
        BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_R=block_r,
        DOT_PRECISION=_dot_precision(a.dtype), UPCAST=_INTERPRETED,
    )


def expand(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, accumulate: bool) -> None:
    """Launch ``c (M x N) (+)= a (M x r) @ b (N x r)^T`` with float32 accumulation.

    Parameters
    ----------
    a, b : torch.Tensor
        Low-rank operands of one dtype, any strides.
    c : torch.Tensor
        Output; read and added to when ``accumulate`` (the base output or ``g W0``).
    accumulate : bool
        Add into ``c`` instead of overwriting it.
    """
    M, R = a.shape
    N = b.shape[0]
    block_m, block_n, block_r = 64, 64, _rank_block(R)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _expand_kernel[grid](
        a, b, c,
        M, N, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        DOT_PRECISION=_dot_precision(a.dtype), UPCAST=_INTERPRETED,
    )
