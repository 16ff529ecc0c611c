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
    table: Tensor,
    n_heads: int,
    n_kv_heads: int,
) -> Tensor:
    """``qkv [T, (H + 2KV) * D]`` -> rotated queries ``[T, H, D]``; keys/values written to the paged
    caches ``[pages, KV, P, D]`` at entry ``p % P`` of page ``table[slot, p // P]``."""
    d, size = k_cache.shape[-1], k_cache.shape[2]
    heads = qkv.view(qkv.shape[0], n_heads + 2 * n_kv_heads, d)
    qk = rotate_half(heads[:, : n_heads + n_kv_heads], cos[positions][:, None], sin[positions][:, None])
    page, entry = table[slots, positions // size].long(), positions % size
    k_cache[page, :, entry] = qk[:, n_heads:].to(k_cache.dtype)
    v_cache[page, :, entry] = heads[:, n_heads + n_kv_heads :].to(v_cache.dtype)
    return qk[:, :n_heads].contiguous()


def slot_entries(cache: Tensor, table: Tensor, slot: int, length: int) -> Tensor:
    """The first ``length`` entries of ``slot`` in a paged cache, ``[KV, length, D]`` float32."""
    size = cache.shape[2]
    pages = table[slot, : -(-length // size)].long()
    return cache[pages].transpose(0, 1).flatten(1, 2)[:, :length].float()


def decode_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor, slots: Tensor, positions: Tensor
) -> Tensor:
    """``q [T, H, D]``, a query per new token, over its slot's positions ``0..positions[t]`` in the
    paged caches -> ``[T, H * D]``."""
    rows = []
    for b in range(q.shape[0]):
        length, slot = int(positions[b]) + 1, int(slots[b])
        keys, values = slot_entries(k_cache, table, slot, length), slot_entries(v_cache, table, slot, length)
        out = F.scaled_dot_product_attention(q[b, :, None], keys, values, enable_gqa=True)  # [H, 1, D]
        rows.append(out.flatten())
    return torch.stack(rows)


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
