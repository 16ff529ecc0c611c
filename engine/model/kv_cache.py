"""What a forward pass attends over, and one layer's keys and values in the expert's KV pages."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.model.kv_pool import PagePool


@dataclass
class AttentionBatch:
    """What one forward pass attends over; passed explicitly to every layer.

    Rows of the batch are the contiguous slots ``first_slot .. first_slot + B``, or the slots
    named in ``slots`` (a few sequences of a batch, e.g. the ones an R2R router flagged).
    """

    first_slot: int
    positions: Tensor  # [B, S] absolute position of each new token
    kv_len: int  # cache positions the attention reads (max position + 1)
    mask: Tensor | None  # [B, 1, S, kv_len] bool, True = attend; None = plain causal from 0
    slot_index: Tensor  # [B, S] the slot of each new token, for scattering into the cache
    slots: Tensor | None = None  # [B] when the rows are not contiguous
    # an H2O cache's bookkeeping: how many of each row's tokens are real (the rest pad a batch
    # of uneven rows), and whether the step waits for ModelRunner.commit (speculative drafts)
    lengths: Tensor | None = None
    provisional: bool = False

    @classmethod
    def build(cls, first_slot: int, positions: Tensor, slots: Tensor | None = None) -> AttentionBatch:
        kv_len = int(positions.max()) + 1
        batch, seq = positions.shape
        if slots is None:
            rows = torch.arange(first_slot, first_slot + batch, device=positions.device)
        else:
            rows, first_slot = slots, int(slots[0])
        slot_index = rows.view(batch, 1).expand(batch, seq)
        if batch == 1 and seq == kv_len:
            return cls(first_slot, positions, kv_len, None, slot_index, slots)  # a fresh prompt: causal from 0
        key_pos = torch.arange(kv_len, device=positions.device)
        mask = key_pos.view(1, 1, 1, kv_len) <= positions.view(batch, 1, seq, 1)
        return cls(first_slot, positions, kv_len, mask, slot_index, slots)

    @property
    def rows(self) -> slice | Tensor:
        """The cache rows this batch reads: a slice (a view) when contiguous, else an index."""
        if self.slots is not None:
            return self.slots
        return slice(self.first_slot, self.first_slot + self.positions.shape[0])


class KVCache:
    """Keys and values of one layer in the expert's pages: ``k``/``v`` ``[pages + 1, kv_heads,
    page_size, head_dim]`` (kernels/cpu reads the same views through the pool's table)."""

    def __init__(self, pool: PagePool, k: Tensor, v: Tensor) -> None:
        self.pool, self.k, self.v = pool, k, v

    def update(self, batch: AttentionBatch, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values ``[B, S, kv_heads, D]`` in their pages and return what attention
        reads, ``[B, kv_heads, kv_len, D]`` in the new keys' dtype (gathered from the pages)."""
        size = self.pool.page_size
        table = self.pool.table
        page = table[batch.slot_index, batch.positions // size].long()
        entry = batch.positions % size
        self.k[page, :, entry] = k.to(self.k.dtype)
        self.v[page, :, entry] = v.to(self.v.dtype)
        pages = table[batch.rows, : self.pool.pages_for(batch.kv_len)].long()  # [B, n]
        return self._gather(self.k, pages, batch.kv_len, k.dtype), self._gather(self.v, pages, batch.kv_len, v.dtype)

    def slot(self, slot: int, length: int) -> tuple[Tensor, Tensor]:
        """The first ``length`` keys and values of ``slot``, ``[kv_heads, length, D]`` each (copies)."""
        pages = self.pool.table[slot : slot + 1, : self.pool.pages_for(length)].long()
        return self._gather(self.k, pages, length, self.k.dtype)[0], self._gather(self.v, pages, length, self.v.dtype)[
            0
        ]

    @staticmethod
    def _gather(cache: Tensor, pages: Tensor, length: int, dtype: torch.dtype) -> Tensor:
        rows, n = pages.shape
        _, heads, size, dim = cache.shape
        out = cache[pages].transpose(1, 2).reshape(rows, heads, n * size, dim)[:, :, :length]
        return out.to(dtype)

    @property
    def bytes_per_token(self) -> int:
        _, heads, _, dim = self.k.shape
        return token_bytes(1, heads, dim, self.k.element_size(), h2o=False)


def token_bytes(n_layers: int, n_kv_heads: int, head_dim: int, element_size: int, h2o: bool) -> int:
    """Bytes one cached token costs over every layer and KV head: its key and value, and under
    H2O its position (int32) and score (float32)."""
    return n_layers * n_kv_heads * (2 * head_dim * element_size + (8 if h2o else 0))
