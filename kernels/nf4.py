"""NF4 (QLoRA NormalFloat-4) weight-only quantization: reference twin and the fast CPU path.

Format (reference layout, also what the Triton kernels read):
  codes   uint8 ``[N, Kp // 2]``, two code-book indices per byte, the even column in the low nibble;
  absmax  float32 ``[N, Kp // block]``: ``w = NF4[code] * absmax``.
With double quantization the block scales are themselves stored as int8: ``absmax = q * c + offset``
where ``offset`` is their mean and ``c`` a float32 per chunk of 256 scales (QLoRA's scheme with an
int8 instead of an fp8 code). ``Kp`` is ``K`` rounded up to the block; padded weights are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu, dispatch
from kernels.int4 import PackedRows, pack_nibbles, padded_width, unpack_nibbles

# The NF4 code book: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, Appendix E).
CODE_BOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip
BLOCK_SIZE = 64
SCALE_CHUNK = 256  # block scales per float32 chunk scale under double quantization


@dataclass(frozen=True)
class NF4Weight(PackedRows):
    codes: Tensor  # uint8 [N, Kp // 2]
    absmax: Tensor  # float32 [N, Kp // block], or int8 under double quantization
    chunk_scale: Tensor | None  # float32 [ceil(N * Kp / block / 256)] under double quantization
    offset: float
    block_size: int
    in_features: int

    @property
    def double_quant(self) -> bool:
        return self.chunk_scale is not None

    def nbytes(self) -> int:
        parts = [self.codes, self.absmax] + ([self.chunk_scale] if self.chunk_scale is not None else [])
        return sum(t.numel() * t.element_size() for t in parts) + (4 if self.double_quant else 0)

    def block_scales(self) -> Tensor:
        """float32 ``[N, Kp // block]``."""
        if self.chunk_scale is None:
            return self.absmax
        flat = self.absmax.flatten().float()
        chunk = self.chunk_scale.repeat_interleave(SCALE_CHUNK)[: flat.numel()]
        return (flat * chunk + self.offset).view_as(self.absmax)


def bits_per_weight(block_size: int = BLOCK_SIZE, double_quant: bool = False) -> float:
    """Storage per weight: 4-bit code + the block's share of its scale (and of the chunk scale)."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * SCALE_CHUNK)
    return 4 + 32 / block_size


def check_block_size(block_size: int) -> None:
    if block_size <= 0 or block_size % 8:
        raise ValueError(f"nf4 block size must be a positive multiple of 8, got {block_size}")


def _double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, float]:
    offset = absmax.mean().item()
    flat = absmax.flatten() - offset
    pad = -flat.numel() % SCALE_CHUNK
    chunks = F.pad(flat, (0, pad)).view(-1, SCALE_CHUNK)
    chunk_scale = (chunks.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = (chunks / chunk_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q.flatten()[: flat.numel()].view_as(absmax), chunk_scale, offset


def quantize(w: Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = False) -> NF4Weight:
    """Reference quantizer: per block, scale by absmax and round to the nearest code-book entry."""
    check_block_size(block_size)
    if w.ndim != 2 or w.numel() == 0:
        raise ValueError(f"nf4 quantizes a non-empty 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    kp = padded_width(k, block_size)
    blocks = F.pad(w.float(), (0, kp - k)).view(n, kp // block_size, block_size)
    absmax = blocks.abs().amax(dim=-1).clamp(min=1e-12)
    chunk_scale, offset = None, 0.0
    if double_quant:
        absmax_q, chunk_scale, offset = _double_quantize(absmax)
        stored = NF4Weight(torch.empty(0), absmax_q, chunk_scale, offset, block_size, k)
        absmax_used: Tensor = stored.block_scales()  # quantize against the scale dequantization will see
        absmax = absmax_q
    else:
        absmax_used = absmax
    normalised = blocks / absmax_used[..., None]
    midpoints = (CODE_BOOK[1:] + CODE_BOOK[:-1]) / 2
    codes = torch.bucketize(normalised.contiguous(), midpoints).view(n, kp)
    return NF4Weight(pack_nibbles(codes), absmax, chunk_scale, offset, block_size, k)


def dequantize(q: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference dequantizer -> ``[N, K]``."""
    n, kp = q.out_features, q.padded_in_features
    values = CODE_BOOK[unpack_nibbles(q.codes).long()].view(n, kp // q.block_size, q.block_size)
    w = values * q.block_scales()[..., None]
    return w.view(n, kp)[:, : q.in_features].to(dtype)


def matmul_reference(x: Tensor, q: NF4Weight) -> Tensor:
    """The oracle: ``x @ dequantize(q).T`` in float32."""
    return (x.float() @ dequantize(q).T).to(x.dtype)


# --- fast CPU path: the code book is looked up in registers inside the dot product ---------


def cpu_kernel_available() -> bool:
    return cpu.load("nf4") is not None


def matmul_cpu(x: Tensor, q: NF4Weight) -> Tensor:
    """``x [..., K] @ W.T`` with the fused look-up kernel (float32 math); returns ``x``'s dtype."""
    ext = cpu.load("nf4")
    if ext is None:
        return matmul_reference(x, q)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if q.padded_in_features != shape[-1]:
        x2 = F.pad(x2, (0, q.padded_in_features - shape[-1]))
    args = (x2.contiguous(), q.codes, q.absmax, q.chunk_scale, q.offset, CODE_BOOK, q.block_size)
    y = ext.nf4_linear(*args, dispatch.DECODE_MAX_ROWS)
    return y.view(*shape[:-1], q.out_features).to(x.dtype)


def dequantize_cpu(q: NF4Weight) -> Tensor:
    ext = cpu.load("nf4")
    if ext is None:
        return dequantize(q)
    w = ext.nf4_dequantize(q.codes, q.absmax, q.chunk_scale, q.offset, CODE_BOOK, q.block_size)
    return w[:, : q.in_features]


def rows(q: NF4Weight, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Dequantize rows ``ids`` (an embedding lookup on a tied nf4 head)."""
    flat = ids.reshape(-1)
    codes = unpack_nibbles(q.codes[flat]).long()  # [T, Kp]
    if q.chunk_scale is None:
        block_scales = q.absmax[flat]
    else:
        blocks = q.absmax.shape[1]
        index = flat[:, None] * blocks + torch.arange(blocks)
        block_scales = q.absmax[flat].float() * q.chunk_scale[index // SCALE_CHUNK] + q.offset
    scales = block_scales.repeat_interleave(q.block_size, dim=1)
    values = CODE_BOOK[codes] * scales
    return values[:, : q.in_features].reshape(*ids.shape, q.in_features).to(dtype)
