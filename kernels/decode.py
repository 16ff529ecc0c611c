"""Fused CPU kernels for the decode step (kernels/cpu/decode.cpp) and their plain-torch twins.

A decode step of a small model is dominated by per-operator overhead, not arithmetic: RMSNorm,
RoPE with the KV-cache store, and one-token attention are each one C++ call here instead of
several framework operators. Float32 only; callers fall back to torch when ``fused()`` is None.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu


def fused(dtype: torch.dtype) -> ModuleType | None:
    """The compiled decode kernels for ``dtype`` inputs, or None (other dtypes, no compiler)."""
    return cpu.load("decode") if dtype == torch.float32 else None


# --- plain-torch twins (the test oracle, and what runs where the C++ kernels cannot) ----------


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rope_store_reference(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    slots: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
    n_kv_heads: int,
) -> Tensor:
    """``qkv [T, (H + 2KV) * D]`` -> rotated queries ``[T, H, D]``; keys/values written to the caches."""
    d = k_cache.shape[-1]
    heads = qkv.view(qkv.shape[0], n_heads + 2 * n_kv_heads, d)
    qk = rotate_half(heads[:, : n_heads + n_kv_heads], cos[positions][:, None], sin[positions][:, None])
    k_cache[slots, :, positions] = qk[:, n_heads:]
    v_cache[slots, :, positions] = heads[:, n_heads + n_kv_heads :]
    return qk[:, :n_heads].contiguous()


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor) -> Tensor:
    """``q [T, H, D]``, a query per new token, over its slot's cache positions ``0..positions[t]`` -> ``[T, H * D]``."""
    rows = []
    for b in range(q.shape[0]):
        length = int(positions[b]) + 1
        keys, values = k_cache[slots[b], :, :length], v_cache[slots[b], :, :length]  # [KV, L, D]
        out = F.scaled_dot_product_attention(q[b, :, None], keys, values, enable_gqa=True)  # [H, 1, D]
        rows.append(out.flatten())
    return torch.stack(rows)


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
