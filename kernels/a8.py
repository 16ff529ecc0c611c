"""4-bit weights with 8-bit activations: decode-sized matmuls on integer multiply-adds.

The weights keep the int4 / nf4 reference layouts. The activations are quantized on the fly per
block of 32 columns (absmax / 127, round half to even), and each block's dot product with the
weight codes is exact integer arithmetic, scaled once per block. This is how llama.cpp's CPU
path multiplies 4-bit weights; it trades a small activation rounding error (about 1% relative
on a layer's output, see tests/test_a8.py) for a kernel that does 32 weights per instruction
instead of 8. nf4 looks its code book up as ``LUT8 = round(127 * NF4)``.

Two twins: ``*_reference`` in plain torch (the oracle for the C++ kernel) and ``int4_mm`` /
``nf4_mm`` on ``kernels/cpu/a8.cpp`` (AVX2), which return None where it cannot be built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu, int4, nf4

BLOCK = 32  # activation block; every int4 group and nf4 block size is a multiple of it
LUT8 = (nf4.CODE_BOOK * 127).round().to(torch.int8)


def quantize_activations(x: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` zero-padded to ``width`` -> (int codes ``[M, width]`` as float, scales ``[M, width // 32]``)."""
    x = F.pad(x.float(), (0, width - x.shape[-1])).view(x.shape[0], width // BLOCK, BLOCK)
    d = x.abs().amax(dim=-1) / 127
    q = torch.where(d[..., None] > 0, x / d.clamp(min=1e-30)[..., None], 0.0).round()
    return q.view(x.shape[0], width), d


def _blocked_dot(xq: Tensor, d: Tensor, w_codes: Tensor) -> Tensor:
    """``sum_b d[m, b] * (xq[m, block b] . w_codes[n, block b])`` -> ``[M, N]`` (float64: exact integers)."""
    m, width = xq.shape
    xb = xq.double().view(m, 1, width // BLOCK, BLOCK)
    wb = w_codes.double().view(1, w_codes.shape[0], width // BLOCK, BLOCK)
    return ((xb * wb).sum(-1) * d.double()[:, None, :]).float()  # [M, N, blocks] -> scaled


def int4_reference(x: Tensor, q: int4.Int4Weight) -> Tensor:
    """The A8 int4 product in torch: ``s (d . (codes - 8) xq) + z sum(x)`` per group."""
    shape, kp = x.shape, q.padded_in_features
    x2 = x.reshape(-1, shape[-1]).float()
    xq, d = quantize_activations(x2, kp)
    codes = int4.unpack_nibbles(q.codes).float() - 8
    per_block = _blocked_dot(xq, d, codes)  # [M, N, blocks]
    per_group = per_block.view(*per_block.shape[:2], -1, q.group_size // BLOCK).sum(-1)  # [M, N, G]
    xsum = F.pad(x2, (0, kp - shape[-1])).view(x2.shape[0], 1, -1, q.group_size).sum(-1)  # [M, 1, G]
    y = (per_group * q.scales.float()[None] + xsum * q.zeros.float()[None]).sum(-1)
    return y.view(*shape[:-1], q.out_features).to(x.dtype)


def nf4_reference(x: Tensor, q: nf4.NF4Weight) -> Tensor:
    """The A8 nf4 product in torch: ``absmax / 127 * (d . LUT8[codes] xq)`` per block."""
    shape, kp = x.shape, q.padded_in_features
    xq, d = quantize_activations(x.reshape(-1, shape[-1]), kp)
    codes = LUT8[nf4.unpack_nibbles(q.codes).long()].float()
    per_block = _blocked_dot(xq, d, codes)
    per_scale = per_block.view(*per_block.shape[:2], -1, q.block_size // BLOCK).sum(-1)
    y = (per_scale * q.block_scales().float()[None] / 127).sum(-1)
    return y.view(*shape[:-1], q.out_features).to(x.dtype)


def available() -> bool:
    """Whether the C++ kernel is built (compiling it on first use)."""
    return cpu.load("a8") is not None


# Decode calls these ~120 times per token, so they skip every conversion that is not needed.
def _rows(x: Tensor) -> Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32:
        x2 = x2.float()
    return x2 if x2.is_contiguous() else x2.contiguous()


def _shaped(y: Tensor, x: Tensor) -> Tensor:
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def int4_mm(x: Tensor, q: int4.Int4Weight) -> Tensor | None:
    """The C++ twin of :func:`int4_reference` (None without the extension)."""
    ext = cpu.load("a8")
    if ext is None:
        return None
    return _shaped(ext.int4_mm(_rows(x), q.codes, q.scales, q.zeros, q.group_size), x)


def nf4_mm(x: Tensor, q: nf4.NF4Weight) -> Tensor | None:
    """The C++ twin of :func:`nf4_reference` (None without the extension)."""
    ext = cpu.load("a8")
    if ext is None:
        return None
    return _shaped(ext.nf4_mm(_rows(x), q.codes, q.absmax, q.chunk_scale, q.offset, q.block_size, LUT8), x)


def int4_dequantize(q: int4.Int4Weight) -> Tensor | None:
    """float32 ``[N, Kp]`` from the reference layout in C++ (None without the extension)."""
    ext = cpu.load("a8")
    return None if ext is None else ext.int4_dequantize(q.codes, q.scales, q.zeros, q.group_size)
