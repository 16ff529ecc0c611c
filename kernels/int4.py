"""Group-wise asymmetric int4 weight-only quantization: reference twin and the fast CPU path.

Format (the reference layout, also what the Triton kernels read):
  codes   uint8 ``[N, Kp // 2]``, two 4-bit codes per byte, the even column in the low nibble;
  scales  ``[N, Kp // group]`` and zeros ``[N, Kp // group]`` (bf16), with
  ``w = (code - 8) * scale + zero`` (PyTorch's int4 convention, so the CPU kernel reads them as is).
``Kp`` is ``K`` rounded up to the group size: a partial last group is padded by repeating the
row's last value, which leaves that group's range unchanged, and padded inputs are zero.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu, dispatch

GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's packed CPU kernel accepts
CPU_ROW_MULTIPLE = 64  # the kernel wants N % 16 == 0; 64 also whole-blocks every ISA layout


class PackedRows:
    """Shape of a weight stored as two 4-bit codes per byte, ``codes [N, Kp // 2]``."""

    codes: Tensor

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def padded_in_features(self) -> int:
        return self.codes.shape[1] * 2


@dataclass(frozen=True)
class Int4Weight(PackedRows):
    codes: Tensor  # uint8 [N, Kp // 2]
    scales: Tensor  # [N, Kp // group]
    zeros: Tensor  # [N, Kp // group]
    group_size: int
    in_features: int  # K before padding

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def padded_width(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")


def pad_columns(w: Tensor, width: int) -> Tensor:
    """Pad ``[N, K]`` to ``[N, width]`` by repeating the last column (keeps every group's range)."""
    extra = width - w.shape[1]
    return w if extra == 0 else torch.cat([w, w[:, -1:].expand(-1, extra)], dim=1)


def pack_nibbles(codes: Tensor) -> Tensor:
    """``[N, K]`` integers in 0..15 (K even) -> uint8 ``[N, K // 2]``, even column in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 ``[N, K // 2]`` -> uint8 ``[N, K]`` (inverse of :func:`pack_nibbles`)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


# Range search (optional): each group tries its min/max shrunk towards zero by these factors and
# keeps the one with the least squared error (1.0, plain min/max, is always a candidate). It helps
# weights that were never quantized (tiny-scratch: g128 +3.4% -> +2.5% perplexity) and hurts ones
# that came from a 4-bit file (SmolLM2's Q4_1: g32 +5.7% -> +8.6%), where clipping the extremes
# costs more than the squared error says.
CLIP_STEP, CLIP_STEPS = 0.02, 10
CLIP_RATIOS = tuple(1.0 - CLIP_STEP * i for i in range(CLIP_STEPS))
_SEARCH_ROWS = 4096  # rows per chunk of the search (bounds its memory)


def _grid(lo: Tensor, hi: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """16 evenly spaced levels from ``lo`` to ``hi``: the stored (rounded) scale and zero."""
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(dtype)
    zeros = (lo + 8 * scales.float()).to(dtype)
    return scales, zeros


def _codes(groups: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    # quantize against the stored (rounded) scale and zero so dequantization sees the same numbers
    return ((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).round().clamp(0, 15)


def _search(groups: Tensor, dtype: torch.dtype, ratios: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    best: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    for ratio in ratios:
        scales, zeros = _grid(lo * ratio, hi * ratio, dtype)
        codes = _codes(groups, scales, zeros)
        err = ((codes - 8) * scales.float()[..., None] + zeros.float()[..., None] - groups).square().sum(-1)
        if best is None:
            best = (err, codes, scales, zeros)
            continue
        better = err < best[0]
        best = (
            torch.where(better, err, best[0]),
            torch.where(better[..., None], codes, best[1]),
            torch.where(better, scales, best[2]),
            torch.where(better, zeros, best[3]),
        )
    assert best is not None
    return best[1], best[2], best[3]


def quantize(
    w: Tensor, group_size: int = 64, dtype: torch.dtype = torch.bfloat16, range_search: bool = False
) -> Int4Weight:
    """Reference quantizer: per group, 16 evenly spaced levels over its min/max range, or with
    ``range_search`` over the range shrunk towards zero that gives the least squared error."""
    check_group_size(group_size)
    if w.ndim != 2 or w.numel() == 0:
        raise ValueError(f"int4 quantizes a non-empty 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    kp = padded_width(k, group_size)
    groups = pad_columns(w.float(), kp).view(n, kp // group_size, group_size)
    ratios = CLIP_RATIOS if range_search else (1.0,)
    parts = [_search(groups[i : i + _SEARCH_ROWS], dtype, ratios) for i in range(0, n, _SEARCH_ROWS)]
    codes, scales, zeros = (torch.cat(p) for p in zip(*parts, strict=True))
    return Int4Weight(pack_nibbles(codes.view(n, kp)), scales, zeros, group_size, k)


def dequantize(q: Int4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference dequantizer -> ``[N, K]``."""
    n, kp = q.out_features, q.padded_in_features
    codes = unpack_nibbles(q.codes).view(n, kp // q.group_size, q.group_size).float()
    w = (codes - 8) * q.scales.float()[..., None] + q.zeros.float()[..., None]
    return w.view(n, kp)[:, : q.in_features].to(dtype)


def rows(q: Int4Weight, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Dequantize rows ``ids`` (an embedding lookup on a tied int4 head) -> ``[*ids.shape, K]``."""
    flat = ids.reshape(-1)
    sub = Int4Weight(q.codes[flat], q.scales[flat], q.zeros[flat], q.group_size, q.in_features)
    return dequantize(sub, dtype).view(*ids.shape, q.in_features)


def matmul_reference(x: Tensor, q: Int4Weight) -> Tensor:
    """The oracle: ``x @ dequantize(q).T`` in float32."""
    return (x.float() @ dequantize(q).T).to(x.dtype)


# --- fast CPU path: PyTorch's packed int4 kernel (bf16 activations) ---------------------------


@dataclass(frozen=True)
class Int4CPUWeight:
    packed: Tensor  # the kernel's own blocked layout, uint8 [Np, Kp // 2]
    scales_and_zeros: Tensor  # bf16 [Kp // group, Np, 2]
    group_size: int
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


def to_cpu_layout(q: Int4Weight) -> Int4CPUWeight:
    """Repack the reference layout for ``_weight_int4pack_mm_for_cpu`` (rows padded to a multiple of 64)."""
    n = q.out_features
    n_pad = -(-n // CPU_ROW_MULTIPLE) * CPU_ROW_MULTIPLE - n
    codes = unpack_nibbles(q.codes).to(torch.int32)
    scales, zeros = q.scales.to(torch.bfloat16), q.zeros.to(torch.bfloat16)
    if n_pad:
        codes = F.pad(codes, (0, 0, 0, n_pad), value=8)
        scales, zeros = F.pad(scales, (0, 0, 0, n_pad)), F.pad(zeros, (0, 0, 0, n_pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return Int4CPUWeight(packed, scales_and_zeros, q.group_size, q.in_features, n)


def matmul_cpu(x: Tensor, w: Int4CPUWeight) -> Tensor:
    """``x [..., K] @ W.T``: PyTorch's packed int4 kernel for decode-sized inputs (bf16 activations),
    a float32 GEMM on the weight dequantized from the same packed copy for wide ones."""
    shape = x.shape
    rows = x.numel() // shape[-1]
    kp = w.packed.shape[1] * 2
    if not dispatch.decode_rows(rows) and (wt := dequantize_cpu_t(w)) is not None:
        y = x.reshape(rows, shape[-1]).float() @ wt[: shape[-1]]
    else:
        x2 = x.reshape(rows, shape[-1]).to(torch.bfloat16)
        if kp != shape[-1]:
            x2 = F.pad(x2, (0, kp - shape[-1]))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.scales_and_zeros)
    if y.shape[-1] != w.out_features:
        y = y[:, : w.out_features]
    return y.view(*shape[:-1], w.out_features).to(x.dtype)


def _blocked_layout(block_n: int, n: int, k: int, packed: Tensor) -> Tensor:
    """Row-major codes ``[n, k]`` read back assuming ``block_n``-row blocks stored k-major, with
    row ``j`` of a block in the low nibble and row ``j + block_n / 2`` in the high nibble."""
    half = block_n // 2
    blocks = packed.reshape(n // block_n, k, half)
    lo, hi = (blocks & 15).transpose(1, 2), (blocks >> 4).transpose(1, 2)
    return torch.cat([lo, hi], dim=1).reshape(n, k)


@functools.cache
def cpu_block_n() -> int | None:
    """Which blocked layout this build of the CPU kernel writes (it depends on the ISA), or None."""
    n, k = 128, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block_n in (16, 32, 64, 128):
        if torch.equal(_blocked_layout(block_n, n, k, packed).int(), codes):
            return block_n
    return None


def dequantize_cpu_t(w: Int4CPUWeight) -> Tensor | None:
    """float32 ``W^T [Kp, Np]`` from the packed CPU layout, or None where the C++ kernel is unavailable."""
    block_n = cpu_block_n()
    ext = cpu.load("int4")
    if ext is None or block_n is None:
        return None
    return ext.int4_dequantize_t(w.packed, w.scales_and_zeros, w.group_size, block_n)


def cpu_rows(w: Int4CPUWeight, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Dequantize rows ``ids`` of a packed CPU weight (an embedding lookup on a tied int4 head)."""
    block_n = cpu_block_n()
    if block_n is None or w.packed.shape[0] % block_n:
        raise NotImplementedError("unrecognised packed int4 CPU layout; keep the embedding unquantized")
    kp, half = w.packed.shape[1] * 2, block_n // 2
    flat = ids.reshape(-1)
    blocks = w.packed.view(-1, kp, half)[flat // block_n]  # [T, Kp, half]
    lane = (flat % half)[:, None, None].expand(-1, kp, 1)
    byte = blocks.gather(2, lane).squeeze(2)  # [T, Kp]
    high = (flat % block_n >= half)[:, None]
    codes = torch.where(high, byte >> 4, byte & 15).float()
    sz = w.scales_and_zeros[:, flat].float()  # [G, T, 2]
    scales = sz[..., 0].T.repeat_interleave(w.group_size, dim=1)
    zeros = sz[..., 1].T.repeat_interleave(w.group_size, dim=1)
    rows = (codes - 8) * scales + zeros
    return rows[:, : w.in_features].reshape(*ids.shape, w.in_features).to(dtype)
