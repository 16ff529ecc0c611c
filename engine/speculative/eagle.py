"""An EAGLE-style draft head: it drafts from the target's own features instead of a model of its own.

At position t the head takes the target's final-normed hidden state ``f_t`` and the embedding of
the token that follows, ``x_{t+1}`` (the target's embedding table, frozen), fuses them with one
linear map to the model width, and runs one Llama decoder layer over them (attending to its own
earlier positions). Its output stands for ``f_{t+1}``: the target's final norm and an LM head
restricted to the K most frequent tokens of the target's own answers (rows of the target's LM
head, frozen) turn it into a distribution over those K tokens, from which the next draft comes.
The head then feeds its own output forward as the next feature, so drafts chain.

Only the fusion and the layer are trained (``train_draft_head``); the norm, the reduced LM head and
the embedding are the target's, taken from it when the head is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class HeadConfig:
    """The head's shape: the target's width, heads and MLP size (one layer), and K."""

    dim: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int  # the target's
    rope_theta: float
    norm_eps: float

    @classmethod
    def of(cls, args: Any) -> HeadConfig:
        """A Llama target's ``ModelArgs``."""
        return cls(
            args.dim,
            args.n_heads,
            args.n_kv_heads,
            args.intermediate_size,
            args.vocab_size,
            args.rope_theta,
            args.norm_eps,
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE, rotate-half layout: ``x [B, T, H, D]``, ``cos``/``sin`` ``[B, T, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class HeadLayer(nn.Module):
    """One pre-norm Llama decoder layer (grouped-query attention with RoPE, SwiGLU MLP)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.dim, cfg.head_dim
        self.attention_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ffn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.w1 = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, cache: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x [B, T, dim]`` at ``positions [B, T]``, after the keys and values in ``cache``
        (``[B, Hkv, S, D]`` each; None: none) -> the output and the cache with these T appended."""
        cfg, (b, t, _) = self.cfg, x.shape
        h = self.attention_norm(x)
        q = self.wq(h).view(b, t, cfg.n_heads, cfg.head_dim)
        k = self.wk(h).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = self.wv(h).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        cos, sin = rope(cfg, positions, x.dtype)
        q, k = _rotate(q, cos, sin).transpose(1, 2), _rotate(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        past = k.shape[2] - t
        # causal over this call's rows, everything cached before them visible
        mask = torch.ones(t, k.shape[2], dtype=torch.bool).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(out.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h)), (k, v)


@torch.no_grad()
def target_lm_head(transformer: Any) -> Tensor:
    """The target's LM head as rows ``[V, dim]``, float32 (dequantized where it is quantized):
    what the head is trained against and serves with."""
    dim = transformer.args.dim
    return transformer.output(torch.eye(dim, dtype=torch.float32)).float().T.contiguous()


_ROPE: dict[tuple[int, float, torch.dtype], tuple[Tensor, Tensor]] = {}


def rope(cfg: HeadConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, T, 1, D]`` for ``positions [B, T]``, from tables made once (grown as needed)."""
    key = (cfg.head_dim, cfg.rope_theta, dtype)
    cos, sin = _ROPE.get(key, (torch.empty(0), torch.empty(0)))
    need = int(positions.max()) + 1
    if cos.shape[0] < need:
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
        angles = torch.outer(torch.arange(max(need, 4096), dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = _ROPE[key] = angles.cos().to(dtype), angles.sin().to(dtype)
    return cos[positions][:, :, None, :], sin[positions][:, :, None, :]


class DraftHead(nn.Module):
    """The trained part (``fc``, ``layer``) and the target's frozen parts (embedding, final norm,
    the K rows of its LM head, as buffers set by ``attach``)."""

    vocab: Tensor  # [K] the target token ids the head drafts, ascending (a persistent buffer)

    def __init__(self, cfg: HeadConfig, vocab: Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(2 * cfg.dim, cfg.dim, bias=True)
        self.layer = HeadLayer(cfg)
        self.register_buffer("vocab", vocab.to(torch.long).clone(), persistent=True)  # [K] target token ids
        self.embed: Callable[[Tensor], Tensor] = _unattached
        self.norm_weight: Tensor = torch.empty(0)
        self.lm_head: Tensor = torch.empty(0)  # [K, dim]

    def attach(self, embedding: Tensor | Callable[[Tensor], Tensor], norm_weight: Tensor, lm_head: Tensor) -> DraftHead:
        """The target's embedding (a table ``[V, dim]``, or its embedding module: a quantized table
        stays quantized), final norm weight and full LM head ``[V, dim]`` (shared, never trained);
        the head keeps the rows of its K tokens."""
        dtype = self.fc.weight.dtype
        if isinstance(embedding, Tensor):
            table = embedding.detach()
            self.embed = lambda ids: F.embedding(ids, table)
        else:
            self.embed = embedding
        self.norm_weight = norm_weight.detach().to(dtype)
        self.lm_head = lm_head.detach()[self.vocab].to(dtype).contiguous()
        return self

    @property
    def k(self) -> int:
        return int(self.vocab.numel())

    def forward(
        self, features: Tensor, next_tokens: Tensor, positions: Tensor, cache: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """``features [B, T, dim]`` (``f_t``), ``next_tokens [B, T]`` (``x_{t+1}``) at ``positions``
        (t+1's) -> the predicted features ``[B, T, dim]`` (``f_{t+1}``), logits over the K tokens
        ``[B, T, K]`` and the layer's cache."""
        dtype = self.fc.weight.dtype
        emb = self.embed(next_tokens).to(dtype)
        x = self.fc(torch.cat([features.to(dtype), emb], dim=-1))
        hidden, cache = self.layer(x, positions, cache)
        return hidden, self.logits(hidden), cache

    def logits(self, hidden: Tensor) -> Tensor:
        """Features -> logits over the K tokens, as the target's norm and LM head make them."""
        normed = F.rms_norm(hidden, (hidden.shape[-1],), self.norm_weight, self.cfg.norm_eps)
        return normed @ self.lm_head.T

    def target_logits(self, features: Tensor) -> Tensor:
        """The target's own logits over the K tokens from its (final-normed) features: ``f @ W_K^T``."""
        return features.to(self.lm_head.dtype) @ self.lm_head.T

    def save(self, path: Path, meta: dict[str, object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in self.state_dict().items()}
        torch.save({"config": asdict(self.cfg), "state": state, "meta": meta}, path)

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32) -> tuple[DraftHead, dict[str, object]]:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        cfg = HeadConfig(**blob["config"])
        head = cls(cfg, blob["state"]["vocab"])
        head.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in blob["state"].items()})
        return head.to(dtype), dict(blob.get("meta", {}))


def _unattached(ids: Tensor) -> Tensor:
    raise RuntimeError("DraftHead.attach must give the head the target's embedding first")


@torch.no_grad()
def init_weights(head: DraftHead, seed: int) -> None:
    """Small random weights (the layer's output projections scaled down, as for a residual
    branch), and a fusion that starts as the identity on the feature: an untrained head predicts
    ``f_{t+1} = f_t`` plus what its layer adds."""
    g = torch.Generator().manual_seed(seed)
    for name, p in head.named_parameters():
        if p.dim() == 2:
            std = 0.02 / (math.sqrt(2.0) if name.endswith(("wo.weight", "w2.weight")) else 1.0)
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("bias"):
            p.zero_()
    dim = head.cfg.dim
    head.fc.weight[:, :dim] += torch.eye(dim)
