"""Triton GPU twins of the int4 and nf4 kernels: quantize, dequantize and fused dequantize-matmul.

They read the reference layouts of :mod:`kernels.int4` and :mod:`kernels.nf4` (moved to the GPU)
unchanged. The matmul has two shapes: a GEMV-style kernel for decode (a few rows: each program
reduces a strip of output columns with the weight dequantized in registers) and a tiled
``tl.dot`` kernel for prefill (the dequantized tile feeds the tensor cores in bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import int4, nf4

INT4, NF4 = 0, 1
DECODE_MAX_ROWS = 8


@triton.jit
def _pick4(b0, b1, lut_ptr, base: tl.constexpr):
    low = tl.where(b0, tl.load(lut_ptr + base + 1), tl.load(lut_ptr + base))
    high = tl.where(b0, tl.load(lut_ptr + base + 3), tl.load(lut_ptr + base + 2))
    return tl.where(b1, high, low)


@triton.jit
def _code_book_lookup(codes, lut_ptr):
    """NF4 values of 4-bit codes by a select tree on the code's bits, scalars from the code book:
    a per-element gather from memory costs far more than fifteen selects."""
    b0, b1, b2, b3 = (codes & 1) != 0, (codes & 2) != 0, (codes & 4) != 0, (codes & 8) != 0
    low = tl.where(b2, _pick4(b0, b1, lut_ptr, 4), _pick4(b0, b1, lut_ptr, 0))
    high = tl.where(b2, _pick4(b0, b1, lut_ptr, 12), _pick4(b0, b1, lut_ptr, 8))
    return tl.where(b3, high, low)


@triton.jit
def _dequant_tile(
    codes_ptr,
    s_ptr,
    z_ptr,
    chunk_ptr,
    lut_ptr,
    offset,
    rn,
    k0,
    N,
    n_groups,
    GROUP: tl.constexpr,
    FORMAT: tl.constexpr,
    DQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Weights ``[BLOCK_N, BLOCK_K]`` (float32) of rows ``rn`` from column ``k0``; one group per tile."""
    n_mask = rn < N
    half = tl.arange(0, BLOCK_K // 2)
    packed = tl.load(
        codes_ptr + rn[:, None] * (n_groups * GROUP // 2) + k0 // 2 + half[None, :], mask=n_mask[:, None], other=0
    )
    codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K))  # even column = low nibble
    scale_at = rn * n_groups + k0 // GROUP
    if FORMAT == 0:
        scale = tl.load(s_ptr + scale_at, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + scale_at, mask=n_mask, other=0.0).to(tl.float32)
        w = (codes.to(tl.float32) - 8.0) * scale[:, None] + zero[:, None]
    else:
        if DQ:
            q = tl.load(s_ptr + scale_at, mask=n_mask, other=0).to(tl.float32)
            scale = q * tl.load(chunk_ptr + scale_at // 256, mask=n_mask, other=0.0) + offset
        else:
            scale = tl.load(s_ptr + scale_at, mask=n_mask, other=0.0)
        w = _code_book_lookup(codes, lut_ptr) * scale[:, None]
    return w


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=4) for bn in (8, 16, 32)],
    key=["N", "K", "GROUP", "FORMAT"],
)
@triton.jit
def _gemv_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    s_ptr,
    z_ptr,
    chunk_ptr,
    lut_ptr,
    offset,
    N,
    K,
    n_groups,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,
    FORMAT: tl.constexpr,
    DQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, n_groups * GROUP, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
        w = _dequant_tile(
            codes_ptr,
            s_ptr,
            z_ptr,
            chunk_ptr,
            lut_ptr,
            offset,
            rn,
            k0,
            N,
            n_groups,
            GROUP,
            FORMAT,
            DQ,
            BLOCK_N,
            BLOCK_K,
        )
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in ((16, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3))
    ],
    key=["M_BUCKET", "N", "K", "GROUP", "FORMAT"],
)
@triton.jit
def _gemm_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    s_ptr,
    z_ptr,
    chunk_ptr,
    lut_ptr,
    offset,
    M,
    N,
    K,
    n_groups,
    stride_xm,
    stride_om,
    M_BUCKET,
    GROUP: tl.constexpr,
    FORMAT: tl.constexpr,
    DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_groups * GROUP, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
        )
        w = _dequant_tile(
            codes_ptr,
            s_ptr,
            z_ptr,
            chunk_ptr,
            lut_ptr,
            offset,
            rn,
            k0,
            N,
            n_groups,
            GROUP,
            FORMAT,
            DQ,
            BLOCK_N,
            BLOCK_K,
        )
        acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dequant_kernel(
    out_ptr,
    codes_ptr,
    s_ptr,
    z_ptr,
    chunk_ptr,
    lut_ptr,
    offset,
    N,
    K,
    n_groups,
    GROUP: tl.constexpr,
    FORMAT: tl.constexpr,
    DQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    w = _dequant_tile(
        codes_ptr, s_ptr, z_ptr, chunk_ptr, lut_ptr, offset, rn, k0, N, n_groups, GROUP, FORMAT, DQ, BLOCK_N, BLOCK_K
    )
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn[:, None] < N) & (rk[None, :] < K))


@triton.jit
def _quantize_kernel(
    w_ptr,
    codes_ptr,
    s_ptr,
    z_ptr,
    mid_ptr,
    N,
    K,
    n_groups,
    GROUP: tl.constexpr,
    FORMAT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_RATIOS: tl.constexpr,
    CLIP_STEP: tl.constexpr,
):
    """One group per program column: int4 levels over the searched range, or nf4 absmax + nearest code."""
    pid_n, g = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = g * GROUP + tl.arange(0, GROUP)
    n_mask = rn < N
    # columns past K repeat the row's last value (int4) or are zero (nf4), as in the reference
    src = tl.minimum(rk, K - 1) if FORMAT == 0 else rk
    w = tl.load(w_ptr + rn[:, None] * K + src[None, :], mask=n_mask[:, None] & (src[None, :] < K), other=0.0)
    w = w.to(tl.float32)
    if FORMAT == 0:  # the reference's range search: min/max shrunk towards zero, least squared error
        lo, hi = tl.min(w, axis=1), tl.max(w, axis=1)
        for i in tl.static_range(N_RATIOS):
            ratio = 1.0 - CLIP_STEP * i
            s_i = tl.maximum((hi * ratio - lo * ratio) / 15.0, 1e-8).to(s_ptr.dtype.element_ty)
            z_i = (lo * ratio + 8.0 * s_i.to(tl.float32)).to(z_ptr.dtype.element_ty)
            c_i = (w - z_i.to(tl.float32)[:, None]) / s_i.to(tl.float32)[:, None] + 8.0
            c_i = tl.minimum(tl.maximum(tl.extra.cuda.libdevice.rint(c_i), 0.0), 15.0)
            diff = (c_i - 8.0) * s_i.to(tl.float32)[:, None] + z_i.to(tl.float32)[:, None] - w
            err = tl.sum(diff * diff, axis=1)
            if i == 0:
                best, scale, zero, codes_f = err, s_i, z_i, c_i
            else:
                better = err < best
                best = tl.where(better, err, best)
                scale, zero = tl.where(better, s_i, scale), tl.where(better, z_i, zero)
                codes_f = tl.where(better[:, None], c_i, codes_f)
        codes = codes_f.to(tl.uint8)
        tl.store(z_ptr + rn * n_groups + g, zero, mask=n_mask)
    else:
        scale = tl.maximum(tl.max(tl.abs(w), axis=1), 1e-12)
        normalised = w / scale[:, None]
        codes = tl.zeros((BLOCK_N, GROUP), dtype=tl.uint8)
        for i in tl.static_range(15):
            codes += (normalised > tl.load(mid_ptr + i)).to(tl.uint8)
    tl.store(s_ptr + rn * n_groups + g, scale, mask=n_mask)
    lo_codes, hi_codes = tl.split(tl.reshape(codes, (BLOCK_N, GROUP // 2, 2)))
    half = tl.arange(0, GROUP // 2)
    tl.store(
        codes_ptr + rn[:, None] * (n_groups * GROUP // 2) + g * (GROUP // 2) + half[None, :],
        lo_codes | (hi_codes << 4),
        mask=n_mask[:, None],
    )


def _operands(q: int4.Int4Weight | nf4.NF4Weight) -> tuple[tuple, int, int, bool]:
    """(pointer operands, group, format, double-quant) for the kernels."""
    if isinstance(q, int4.Int4Weight):
        return (q.codes, q.scales, q.zeros, q.scales, q.scales, 0.0), q.group_size, INT4, False
    chunk = q.chunk_scale if q.chunk_scale is not None else q.absmax
    lut = _code_book(q.codes.device)
    return (q.codes, q.absmax, q.absmax, chunk, lut, float(q.offset)), q.block_size, NF4, q.double_quant


_CODE_BOOKS: dict[torch.device, Tensor] = {}


def _code_book(device: torch.device) -> Tensor:
    """The nf4 code book on ``device``, copied once (a per-call host-to-device copy costs more than the kernel)."""
    if device not in _CODE_BOOKS:
        _CODE_BOOKS[device] = nf4.CODE_BOOK.to(device)
    return _CODE_BOOKS[device]


def _block_k(group: int) -> int:
    if group % 16 or group < 16:
        raise ValueError(f"the Triton kernels need a group/block size that is a multiple of 16, got {group}")
    return min(group, 128)


def matmul(x: Tensor, q: int4.Int4Weight | nf4.NF4Weight) -> Tensor:
    """``x [..., K] @ W.T`` on the GPU with the weight dequantized inside the kernel."""
    operands, group, fmt, dq = _operands(q)
    block_k = _block_k(group)
    shape, k = x.shape, q.in_features
    x2 = x.reshape(-1, k).contiguous()
    m, n, n_groups = x2.shape[0], q.out_features, q.padded_in_features // group
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m <= DECODE_MAX_ROWS:
        _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)](
            x2,
            out,
            *operands,
            n,
            k,
            n_groups,
            x2.stride(0),
            out.stride(0),
            GROUP=group,
            FORMAT=fmt,
            DQ=dq,
            BLOCK_K=block_k,
        )
    else:
        bucket = 1 << (m - 1).bit_length()  # re-tune per power of two of the row count, not per length
        _gemm_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))](
            x2,
            out,
            *operands,
            m,
            n,
            k,
            n_groups,
            x2.stride(0),
            out.stride(0),
            bucket,
            GROUP=group,
            FORMAT=fmt,
            DQ=dq,
            BLOCK_K=block_k,
        )
    return out.view(*shape[:-1], n)


def dequantize(q: int4.Int4Weight | nf4.NF4Weight) -> Tensor:
    operands, group, fmt, dq = _operands(q)
    block_k = _block_k(group)
    n, k = q.out_features, q.in_features
    out = torch.empty(n, k, dtype=torch.float32, device=q.codes.device)
    grid = (triton.cdiv(n, 32), q.padded_in_features // block_k)
    _dequant_kernel[grid](
        out, *operands, n, k, q.padded_in_features // group, GROUP=group, FORMAT=fmt, DQ=dq, BLOCK_N=32, BLOCK_K=block_k
    )
    return out


def _quantize_into(
    w: Tensor, group: int, fmt: int, scale_dtype: torch.dtype, range_search: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    n, k = w.shape
    n_groups = int4.padded_width(k, group) // group
    codes = torch.empty(n, n_groups * group // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, n_groups, dtype=scale_dtype, device=w.device)
    zeros = torch.empty_like(scales)
    mids = ((nf4.CODE_BOOK[1:] + nf4.CODE_BOOK[:-1]) / 2).to(w.device)
    grid = (triton.cdiv(n, 16), n_groups)
    _quantize_kernel[grid](
        w.contiguous(),
        codes,
        scales,
        zeros,
        mids,
        n,
        k,
        n_groups,
        GROUP=group,
        FORMAT=fmt,
        BLOCK_N=16,
        N_RATIOS=int4.CLIP_STEPS if range_search else 1,
        CLIP_STEP=int4.CLIP_STEP,
    )
    return codes, scales, zeros


def quantize_int4(
    w: Tensor, group_size: int = 64, dtype: torch.dtype = torch.bfloat16, range_search: bool = False
) -> int4.Int4Weight:
    int4.check_group_size(group_size)
    codes, scales, zeros = _quantize_into(w, group_size, INT4, dtype, range_search)
    return int4.Int4Weight(codes, scales, zeros, group_size, w.shape[1])


def quantize_nf4(w: Tensor, block_size: int = nf4.BLOCK_SIZE) -> nf4.NF4Weight:
    """Without double quantization (the scale statistics of double quantization run in torch)."""
    _block_k(block_size)
    codes, absmax, _ = _quantize_into(w, block_size, NF4, torch.float32)
    return nf4.NF4Weight(codes, absmax, None, 0.0, block_size, w.shape[1])
