"""Where the draft head's arithmetic runs: the native step (its layer and reduced LM head in int4,
one C++ call for every row of a drafting pass) or PyTorch (the float reference twin).

Both hold a cache per head slot and take rows of ``(feature, next token, position, slot)``; a
row's position is counted from where its sequence's head entries start, so a head that starts
afresh part-way through a sequence writes from 0. Writing a row at position p makes p the end of
that slot's cache: entries past it (chained drafts that did not stand) are never read again, so
rolling the head back with the target is writing the next row where the target's tokens end.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from engine.speculative.eagle import DraftHead, rope
from kernels import a8, cpu, int4
from kernels.step import INT4, pack

GROUP = 32  # the int4 group of the native head's matrices (the target's default)
PAGE = 16  # tokens per page of the native head's cache


class HeadCompute(Protocol):
    head: DraftHead

    def run(
        self, features: Tensor, tokens: Tensor, positions: Tensor, slots: Tensor, tail: int
    ) -> tuple[Tensor, Tensor]:
        """Rows ``features [T, dim]``, ``tokens [T]`` at ``positions [T]`` of ``slots [T]`` (each
        slot's rows in order of position, starting at or before where its entries end) -> the
        head's output features ``[tail, dim]`` (float32) and its logits over its K tokens
        ``[tail, K]`` for the last ``tail`` rows."""
        ...


class TorchHeadCompute:
    """The reference: ``DraftHead`` in float, one call per slot, its cache cut where a row writes."""

    def __init__(self, head: DraftHead) -> None:
        self.head = head
        self.caches: dict[int, tuple[Tensor, Tensor]] = {}

    @torch.inference_mode()
    def run(
        self, features: Tensor, tokens: Tensor, positions: Tensor, slots: Tensor, tail: int
    ) -> tuple[Tensor, Tensor]:
        hidden = torch.empty(features.shape[0], features.shape[1])
        logits = torch.empty(features.shape[0], self.head.k)
        order = slots.tolist()
        i = 0
        while i < len(order):  # each slot's run of rows
            j = i
            while j < len(order) and order[j] == order[i]:
                j += 1
            slot, start = order[i], int(positions[i])
            cache = self.caches.get(slot)
            if cache is not None:
                cache = (cache[0][:, :, :start], cache[1][:, :, :start])
            assert start == (0 if cache is None else cache[0].shape[2]), "a slot's rows must continue its cache"
            out, lg, self.caches[slot] = self.head(
                features[None, i:j], tokens[None, i:j], positions[None, i:j], cache if start else None
            )
            hidden[i:j], logits[i:j] = out[0].float(), lg[0].float()
            i = j
        return hidden[-tail:] if tail else hidden[:0], logits[-tail:] if tail else logits[:0]


class NativeHeadCompute:
    """The head as a one-layer model on the native decode step (sharing the target's threads): the
    fusion as the step's input projection, the layer and the K rows of the LM head, all int4
    tiles; the cache bf16 pages (``slots`` sequences of ``capacity`` positions, resident only as
    they are written)."""

    def __init__(self, head: DraftHead, slots: int, capacity: int) -> None:
        ext = cpu.load("step")
        if ext is None:
            raise RuntimeError("the native step could not be built")
        cfg, layer = head.cfg, head.layer
        self.head = head
        with torch.no_grad():
            cos, sin = rope(cfg, torch.arange(capacity)[None], torch.float32)  # the float head's tables
            self.step = ext.Step(
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.head_dim,
                cfg.intermediate_size,
                cfg.norm_eps,
                cos.view(capacity, -1),
                sin.view(capacity, -1),
                head.norm_weight.float(),
                a8.LUT8,
                torch.get_num_threads(),
            )
            per_seq = -(-capacity // PAGE)
            shape = (slots * per_seq, cfg.n_kv_heads, PAGE, cfg.head_dim)
            self.k_cache = torch.empty(shape, dtype=torch.bfloat16)
            self.v_cache = torch.empty(shape, dtype=torch.bfloat16)
            self.step.add_layer(
                layer.attention_norm.weight.detach().float(),
                layer.ffn_norm.weight.detach().float(),
                _int4(torch.cat([layer.wq.weight, layer.wk.weight, layer.wv.weight])),
                _int4(layer.wo.weight),
                _int4(torch.cat([layer.w1.weight, layer.w3.weight])),
                _int4(layer.w2.weight),
                self.k_cache,
                self.v_cache,
            )
            self.step.set_output(_int4(head.lm_head))
            self.step.set_input(_int4(head.fc.weight), head.fc.bias.detach().float())
            # each slot owns its pages outright: page j of slot s is s * per_seq + j
            self.table = torch.arange(slots * per_seq, dtype=torch.int32).view(slots, per_seq).contiguous()
            self.step.set_pages(self.table, PAGE)
            self.step.set_residual_hidden(True)
            # the embeddings of the head's own K tokens, read once: nearly every token it takes in is
            # one (reading a row of the target's quantized table costs more than the head's step)
            self.embedding = head.embed(head.vocab).float()
            self.row_of = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
            self.row_of[head.vocab] = torch.arange(head.k)
            self.step.set_bf16_dot(cpu.selected_isa() == "avx512" and "avx512_bf16" in cpu.cpu_flags())

    @torch.inference_mode()
    def run(
        self, features: Tensor, tokens: Tensor, positions: Tensor, slots: Tensor, tail: int
    ) -> tuple[Tensor, Tensor]:
        rows = self.row_of[tokens]
        emb = self.embedding[rows] if bool((rows >= 0).all()) else self.head.embed(tokens).float()
        x = torch.cat([features.float(), emb], dim=-1)
        logits, hidden, _ = self.step.forward(x, positions, slots, features.shape[0] - tail)
        return hidden, logits


def _int4(weight: Tensor) -> list[Tensor]:
    """(meta, tiles) of a float matrix quantized to int4, as the step reads it."""
    q = int4.quantize(weight.detach().float(), GROUP)
    meta = torch.tensor([INT4, q.out_features, q.in_features, q.padded_in_features, q.group_size], dtype=torch.long)
    return [meta, pack(q)]
