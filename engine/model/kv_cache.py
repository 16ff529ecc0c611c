"""Static key/value cache: one fixed-shape buffer per layer, one row per batch slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


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


class KVCache(nn.Module):
    """Keys and values of one layer for every slot: ``[slots, kv_heads, max_len, head_dim]``."""

    k: Tensor
    v: Tensor

    def __init__(self, n_slots: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (n_slots, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, batch: AttentionBatch, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values ``[B, S, kv_heads, D]`` and return the views attention reads."""
        self.k[batch.slot_index, :, batch.positions] = k
        self.v[batch.slot_index, :, batch.positions] = v
        return self.k[batch.rows, :, : batch.kv_len], self.v[batch.rows, :, : batch.kv_len]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    @property
    def bytes_per_token(self) -> int:
        _, heads, _, dim = self.k.shape
        return token_bytes(1, heads, dim, self.k.element_size(), h2o=False)


def token_bytes(n_layers: int, n_kv_heads: int, head_dim: int, element_size: int, h2o: bool) -> int:
    """Bytes one cached token costs over every layer and KV head: its key and value, and under
    H2O its position (int32) and score (float32)."""
    return n_layers * n_kv_heads * (2 * head_dim * element_size + (8 if h2o else 0))
