"""Runs the model's forward passes over cache slots; knows nothing of requests or sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.model.kv_cache import AttentionBatch
from engine.model.llama import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, n_slots: int, max_len: int) -> None:
        self.model = model
        self.n_slots, self.max_len = n_slots, max_len
        model.setup_caches(n_slots, max_len)

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int) -> Tensor:
        """Write a prompt chunk at positions ``start..`` of ``slot``; logits of its last token ``[V]``."""
        ids = torch.tensor([tokens], dtype=torch.long)
        positions = torch.arange(start, start + len(tokens)).unsqueeze(0)
        return self.model(ids, AttentionBatch.build(slot, positions), last_only=True)[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """One token for each of slots ``0..n-1`` -> logits ``[n, V]``."""
        ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
        pos = torch.tensor(positions, dtype=torch.long).unsqueeze(1)
        return self.model(ids, AttentionBatch.build(0, pos))[:, -1]

    @torch.inference_mode()
    def verify(self, tokens: list[list[int]], positions: list[list[int]]) -> Tensor:
        """Several tokens for each of slots ``0..n-1`` (a token and its drafts) -> logits ``[n, W, V]``."""
        ids = torch.tensor(tokens, dtype=torch.long)
        pos = torch.tensor(positions, dtype=torch.long)
        return self.model(ids, AttentionBatch.build(0, pos))

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        for cache in self.model.kv_caches:
            cache.copy_slot(src, dst, length)

    def kv_bytes_per_token(self) -> int:
        return sum(cache.bytes_per_token for cache in self.model.kv_caches)
