"""Llama-family decoder (RMSNorm, RoPE, GQA attention, SwiGLU) in the gpt-fast manner."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.args import ModelArgs
from engine.model.h2o_cache import H2OKVCache, H2OLayer, KVPolicy
from engine.model.kv_cache import AttentionBatch, KVCache
from engine.model.kv_pool import DEFAULT_PAGE_SIZE, PageLayout, PagePool
from engine.model.linear import Linear
from kernels import decode as fused_decode
from kernels import dispatch
from kernels.step import NativeStep


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if (ext := fused_decode.fused(x.dtype)) is not None and x.is_contiguous():
            return ext.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(args: ModelArgs, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for every position, ``[max_seq_len, head_dim]`` (rotate-half layout)."""
    half = args.head_dim // 2
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@dataclass
class Rotary:
    """RoPE for one forward pass: the full tables, and the rows for this batch's positions."""

    cos_table: Tensor  # [max_seq_len, D]
    sin_table: Tensor
    cos: Tensor | None = None  # [B, S, 1, D]; None where the fused decode kernels rotate
    sin: Tensor | None = None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = Linear(args.dim, qkv_out, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | H2OLayer | None = None

    def forward(self, x: Tensor, rotary: Rotary, batch: AttentionBatch) -> Tensor:
        assert self.kv_cache is not None, "setup_caches() must run before forward()"
        if isinstance(self.kv_cache, H2OLayer):
            return self._forward_h2o(x, rotary, batch, self.kv_cache)
        if rotary.cos is None or rotary.sin is None:
            return self._decode_fused(x, rotary, batch, self.kv_cache)
        bsz, seq, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qk, v = self.wqkv(x).split([q_size + kv_size, kv_size], dim=-1)
        qk = fused_decode.rotate_half(
            qk.view(bsz, seq, self.n_heads + self.n_kv_heads, self.head_dim), rotary.cos, rotary.sin
        )
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)  # one rotation for queries and keys
        v = v.view(bsz, seq, self.n_kv_heads, self.head_dim)
        keys, values = self.kv_cache.update(batch, k, v)  # [B, kv_heads, L, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            values,
            attn_mask=batch.mask,
            is_causal=batch.mask is None,
            enable_gqa=True,
        )  # [B, H, S, D]
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, q_size))

    def _forward_h2o(self, x: Tensor, rotary: Rotary, batch: AttentionBatch, cache: H2OLayer) -> Tensor:
        """Attention over the heavy hitters and recent window the cache kept (keys stored rotated)."""
        assert rotary.cos is not None and rotary.sin is not None  # an H2O model always rotates here
        bsz, seq, _ = x.shape
        heads = self.wqkv(x).view(bsz, seq, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk = fused_decode.rotate_half(heads[:, :, : self.n_heads + self.n_kv_heads], rotary.cos, rotary.sin)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        v = heads[:, :, self.n_heads + self.n_kv_heads :]
        out = cache.attend(batch, q, k, v, fused_decode.attention_scale(self.head_dim))
        return self.wo(out)

    def _decode_fused(self, x: Tensor, rotary: Rotary, batch: AttentionBatch, cache: KVCache) -> Tensor:
        """A few tokens per sequence (decode, or a token and its drafts) through the C++ kernels.

        Every token is rotated, stored, and then attends to its own slot's cache up to its own
        position, with the same arithmetic whether it arrives alone or with drafts: verifying
        drafts gives bit-for-bit the logits plain decoding would have.
        """
        ext = fused_decode.fused(x.dtype)
        assert ext is not None
        bsz, seq, _ = x.shape
        slots, positions = batch.slot_index.reshape(-1).contiguous(), batch.positions.reshape(-1).contiguous()
        qkv = self.wqkv(x).reshape(bsz * seq, -1).contiguous()
        table = cache.pool.table
        q = ext.rope_store(
            qkv,
            rotary.cos_table,
            rotary.sin_table,
            positions,
            slots,
            cache.k,
            cache.v,
            table,
            self.n_heads,
            self.n_kv_heads,
        )
        scale = fused_decode.attention_scale(self.head_dim)
        out = ext.decode_attention(q, cache.k, cache.v, table, slots, positions, scale)
        return self.wo(out.view(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w13(x)
        if dispatch.decode_rows(h.numel() // h.shape[-1]) and (ext := fused_decode.fused(h.dtype)) is not None:
            return self.w2(ext.silu_mul(h.contiguous()))  # the native step's arithmetic, bit for bit
        gate, up = h.split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rotary: Rotary, batch: AttentionBatch) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rotary, batch)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.blocks: list[TransformerBlock] = [b for b in self.layers if isinstance(b, TransformerBlock)]
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.rope_cos: Tensor | None = None
        self.rope_sin: Tensor | None = None
        self.h2o: H2OKVCache | None = None
        self.native: NativeStep | None = None  # the C++ decode step, where it runs (kernels/step.py)
        self.last_hidden: Tensor | None = None  # the last forward's final-normed hidden states (R2R reads them)
        # the argmax of each of the last forward's logits rows [B, S], where the native step computed it
        self.last_argmax: Tensor | None = None

    def setup_caches(
        self,
        n_slots: int,
        max_len: int,
        policy: KVPolicy | None = None,
        pool: PagePool | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """Set up the KV cache and RoPE tables; ``max_len`` bounds every position. The keys and
        values go in ``pool``'s pages (``kv_dtype``, by default the compute dtype), or, without one,
        in a pool of their own that gives every slot ``max_len`` tokens. Under an H2O ``policy`` a
        slot holds its budget's entries instead (in the pool's pages too, in the compute dtype)."""
        if max_len > self.args.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's context {self.args.max_seq_len}")
        dtype, a = self.norm.weight.dtype, self.args
        self.h2o = None
        if policy is not None and policy.h2o:
            self.h2o = H2OKVCache(a.n_layers, n_slots, a.n_kv_heads, a.head_dim, dtype, policy, max_len, pool)
        else:
            pool = pool or PagePool(0, DEFAULT_PAGE_SIZE, n_slots, max_len, dedicated=True)
            storage = pool.storage(PageLayout(a.n_layers, a.n_kv_heads, a.head_dim, kv_dtype or dtype))
        for i, layer in enumerate(self.blocks):
            del layer.attention.kv_cache  # a module or a plain handle: either may replace it
            if self.h2o is not None:
                layer.attention.kv_cache = self.h2o.layer(i)
            else:
                assert pool is not None
                layer.attention.kv_cache = KVCache(pool, *storage.layer(i))
        self.rope_cos, self.rope_sin = rope_tables(self.args, dtype)
        self.native = NativeStep.build(self)

    @property
    def kv_caches(self) -> list[KVCache] | list[H2OKVCache]:
        """What holds the keys and values: a cache per layer, or the one H2O cache of all layers."""
        if self.h2o is not None:
            return [self.h2o]
        return [c for layer in self.blocks if isinstance(c := layer.attention.kv_cache, KVCache)]

    def forward(self, tokens: Tensor, batch: AttentionBatch, last_only: bool = False) -> Tensor:
        """tokens ``[B, S]`` -> logits ``[B, S, V]`` (``[B, 1, V]`` with ``last_only``)."""
        assert self.rope_cos is not None and self.rope_sin is not None
        # the step attends by position (each token to its slot's entries up to its own position), which
        # is what every mask AttentionBatch.build makes; a prompt chunk (one row, last_only) takes it too
        native = self.native
        prompt = last_only and tokens.shape[0] == 1
        if native is not None and (not last_only or prompt) and native.fits(tokens.numel(), prompt):
            kept = (tokens.shape[0], 1) if last_only else tokens.shape
            flat, hidden, best = native(
                tokens.reshape(-1),
                batch.positions.reshape(-1),
                batch.slot_index.reshape(-1),
                head_from=tokens.numel() - 1 if last_only else 0,
            )
            self.last_hidden, self.last_argmax = hidden.view(*kept, -1), best.view(*kept)
            return flat.view(*kept, -1)
        self.last_argmax = None
        rotary = Rotary(self.rope_cos, self.rope_sin)
        wide = not dispatch.decode_tokens(tokens.shape[1])
        if wide or self.h2o is not None or fused_decode.fused(self.rope_cos.dtype) is None:
            rotary.cos = self.rope_cos[batch.positions].unsqueeze(2)  # [B, S, 1, D]
            rotary.sin = self.rope_sin[batch.positions].unsqueeze(2)
        x = self.tok_embeddings(tokens)
        if self.h2o is not None:
            self.h2o.begin(batch)
        for layer in self.layers:
            x = layer(x, rotary, batch)
        if self.h2o is not None:
            self.h2o.end_step(batch)
        if last_only:
            x = x[:, -1:]
        self.last_hidden = self.norm(x)
        return self.output(self.last_hidden)
