"""Gemma 3 text decoder, with the Llama model's interface (caches, ``AttentionBatch``, fused linears).

What differs from Llama (transformers' ``modeling_gemma3`` is the reference): embeddings scaled
by sqrt(dim) in their own dtype; RMSNorm scales by ``1 + weight`` in float32; four norms per block
(around attention and around the MLP) and RMSNorm on each query/key head before RoPE; attention
scaled by ``query_pre_attn_scalar ** -0.5``; a GeGLU MLP (tanh GELU); sliding-window layers with
their own RoPE base beside full-attention layers; ``head_dim`` from the config. Plain PyTorch
throughout (the fused C++ decode kernels are Llama's). A sliding layer keeps the full-size cache
and masks out keys that are ``sliding_window`` or more positions behind the query.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.args import GemmaArgs
from engine.model.kv_cache import AttentionBatch, KVCache
from engine.model.kv_pool import DEFAULT_PAGE_SIZE, PageLayout, PagePool
from engine.model.linear import Linear
from kernels.decode import rotate_half

Rope = tuple[Tensor, Tensor]  # cos, sin rows for this batch's positions, [B, S, 1, D]


class GemmaRMSNorm(nn.Module):
    """RMSNorm in float32 scaling by ``1 + weight`` (the stored weight is centred on zero)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())
        return out.type_as(x)


def rope_tables(head_dim: int, theta: float, factor: float, length: int, dtype: torch.dtype) -> Rope:
    """cos/sin ``[length, head_dim]`` (rotate-half layout), computed in float32 as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)) / factor
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class GemmaAttention(nn.Module):
    def __init__(self, args: GemmaArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5
        self.wqkv = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = GemmaRMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = GemmaRMSNorm(args.head_dim, args.norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Rope, batch: AttentionBatch, mask: Tensor | None) -> Tensor:
        """``mask`` ``[B, 1, S, kv_len]`` (True = attend), or None for a fresh prompt (causal from 0)."""
        assert self.kv_cache is not None, "setup_caches() must run before forward()"
        bsz, seq, _ = x.shape
        heads = self.wqkv(x).view(bsz, seq, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = heads.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        q = rotate_half(self.q_norm(q), *rope)
        k = rotate_half(self.k_norm(k), *rope)
        keys, values = self.kv_cache.update(batch, k, v)  # [B, kv_heads, L, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=True,
        )  # [B, H, S, D]
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim))


class GemmaFeedForward(nn.Module):
    """GeGLU: ``w2(gelu_tanh(gate) * up)``, gate and up fused into ``w13``."""

    def __init__(self, args: GemmaArgs) -> None:
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.gelu(gate, approximate="tanh") * up)


class GemmaBlock(nn.Module):
    def __init__(self, args: GemmaArgs, sliding: bool) -> None:
        super().__init__()
        self.sliding = sliding
        self.attention = GemmaAttention(args)
        self.feed_forward = GemmaFeedForward(args)
        self.input_norm = GemmaRMSNorm(args.dim, args.norm_eps)
        self.post_attention_norm = GemmaRMSNorm(args.dim, args.norm_eps)
        self.pre_ffn_norm = GemmaRMSNorm(args.dim, args.norm_eps)
        self.post_ffn_norm = GemmaRMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope: Rope, batch: AttentionBatch, mask: Tensor | None) -> Tensor:
        h = x + self.post_attention_norm(self.attention(self.input_norm(x), rope, batch, mask))
        return h + self.post_ffn_norm(self.feed_forward(self.pre_ffn_norm(h)))


class GemmaTransformer(nn.Module):
    def __init__(self, args: GemmaArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(GemmaBlock(args, sliding) for sliding in args.sliding)
        self.blocks: list[GemmaBlock] = [b for b in self.layers if isinstance(b, GemmaBlock)]
        self.norm = GemmaRMSNorm(args.dim, args.norm_eps)
        self.last_hidden: Tensor | None = None  # the last forward's final-normed hidden states (R2R reads them)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.rope: dict[bool, Rope] = {}  # keyed by "sliding layer": full tables [max_len, D]

    def setup_caches(
        self, n_slots: int, max_len: int, pool: PagePool | None = None, kv_dtype: torch.dtype | None = None
    ) -> None:
        """Set up the KV cache (in ``pool``'s pages, as the Llama model's) and both RoPE tables;
        ``max_len`` bounds every position."""
        if max_len > self.args.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's context {self.args.max_seq_len}")
        a, dtype = self.args, self.norm.weight.dtype
        pool = pool or PagePool(0, DEFAULT_PAGE_SIZE, n_slots, max_len, dedicated=True)
        storage = pool.storage(PageLayout(a.n_layers, a.n_kv_heads, a.head_dim, kv_dtype or dtype))
        for i, layer in enumerate(self.blocks):
            layer.attention.kv_cache = KVCache(pool, *storage.layer(i))
        self.rope = {
            False: rope_tables(a.head_dim, a.rope_theta, a.rope_factor, max_len, dtype),
            True: rope_tables(a.head_dim, a.rope_local_theta, 1.0, max_len, dtype),
        }

    @property
    def kv_caches(self) -> list[KVCache]:
        return [layer.attention.kv_cache for layer in self.blocks if layer.attention.kv_cache is not None]

    def sliding_mask(self, batch: AttentionBatch) -> Tensor | None:
        """The sliding layers' mask: causal, and no key ``sliding_window`` or more positions back."""
        if batch.kv_len <= self.args.sliding_window:
            return batch.mask  # no query is far enough along for any key to leave its window
        key_pos = torch.arange(batch.kv_len, device=batch.positions.device).view(1, 1, 1, -1)
        query_pos = batch.positions.view(batch.positions.shape[0], 1, -1, 1)
        return (key_pos <= query_pos) & (key_pos > query_pos - self.args.sliding_window)

    def forward(self, tokens: Tensor, batch: AttentionBatch, last_only: bool = False) -> Tensor:
        """tokens ``[B, S]`` -> logits ``[B, S, V]`` (``[B, 1, V]`` with ``last_only``)."""
        assert self.rope, "setup_caches() must run before forward()"
        ropes = {
            k: (cos[batch.positions].unsqueeze(2), sin[batch.positions].unsqueeze(2))
            for k, (cos, sin) in self.rope.items()
        }
        masks = {False: batch.mask, True: self.sliding_mask(batch)}
        x = self.tok_embeddings(tokens)
        x = x * torch.tensor(math.sqrt(self.args.dim)).to(x.dtype)  # scaled in the embedding's dtype
        for layer in self.blocks:
            x = layer(x, ropes[layer.sliding], batch, masks[layer.sliding])
        if last_only:
            x = x[:, -1:]
        self.last_hidden = self.norm(x)
        logits = self.output(self.last_hidden)
        if (cap := self.args.final_logit_softcapping) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
