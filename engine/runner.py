"""Runs the model's forward passes over cache slots; knows nothing of requests or sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.loader import EngineModel
from engine.model.h2o_cache import H2OKVCache, KVPolicy
from engine.model.kv_cache import AttentionBatch
from engine.model.kv_pool import DEFAULT_PAGE_SIZE, PagePool
from engine.model.llama import Transformer
from kernels import dispatch


class ModelRunner:
    def __init__(
        self,
        model: EngineModel,
        n_slots: int,
        max_len: int,
        kv: KVPolicy | None = None,
        pool: PagePool | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """``pool``: the expert's KV pages, which every model of the expert shares (its own pool,
        giving each slot ``max_len`` tokens, or an H2O budget's entries, without one); ``kv_dtype``:
        of the keys and values stored there (the compute dtype by default; H2O keeps that)."""
        self.model = model
        self.n_slots, self.max_len = n_slots, max_len
        self.kv = kv or KVPolicy()
        self.pool: PagePool
        if self.kv.h2o:
            if not isinstance(model, Transformer):
                raise ValueError("kv_cache policy h2o is implemented for Llama-family models only")
            model.setup_caches(n_slots, max_len, self.kv, pool)
            assert model.h2o is not None
            self.pool = model.h2o.pool
        else:
            self.pool = pool or PagePool(0, DEFAULT_PAGE_SIZE, n_slots, max_len, dedicated=True)
            model.setup_caches(n_slots, max_len, pool=self.pool, kv_dtype=kv_dtype)

    def hold(self, slot: int, tokens: int) -> None:
        """Pages for ``tokens`` tokens of ``slot``, for a caller that runs the model directly on an
        engine's runner (the engine's scheduler hands pages out itself); a no-op where every slot
        has its own."""
        if not self.pool.dedicated:
            self.pool.grow(slot, tokens)

    @property
    def h2o(self) -> H2OKVCache | None:
        return self.model.h2o if isinstance(self.model, Transformer) else None

    def admit(self, slot: int, length: int) -> None:
        """A sequence that can reach ``length`` tokens takes ``slot``: under H2O this sets its budget."""
        if (cache := self.h2o) is not None:
            cache.budget[slot], cache.recent[slot] = self.kv.budget(length, self.max_len)

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int) -> Tensor:
        """Write a prompt chunk at positions ``start..`` of ``slot``; logits of its last token ``[V]``.
        Where the model has a native step, a chunk of a decode pass's size takes it (one call beats
        the torch path's layer-by-layer pass), and so does a longer one, in pieces, where the step
        prefills long prompts faster (``NativeStep.prompt_piece``); else one torch pass."""
        native = getattr(self.model, "native", None)
        piece = len(tokens)
        if native is not None and (piece <= dispatch.NATIVE_MAX_TOKENS or native.long_prompts):
            piece = native.prompt_piece
        logits = None
        for i in range(0, len(tokens), piece):
            ids = torch.tensor([tokens[i : i + piece]], dtype=torch.long)
            positions = torch.arange(start + i, start + i + ids.shape[1]).unsqueeze(0)
            logits = self.model(ids, AttentionBatch.build(slot, positions), last_only=True)[0, -1]
        assert logits is not None, "a prompt chunk has at least one token"
        return logits

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """One token for each of slots ``0..n-1`` -> logits ``[n, V]``."""
        ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
        pos = torch.tensor(positions, dtype=torch.long).unsqueeze(1)
        return self.model(ids, AttentionBatch.build(0, pos))[:, -1]

    def last_hidden(self) -> Tensor | None:
        """The last forward's final-normed hidden states ``[B, S, dim]`` (the draft head's features)."""
        return getattr(self.model, "last_hidden", None)

    def greedy_tokens(self) -> list[int] | None:
        """The argmax of each row of the last ``decode``'s logits, where the native step computed
        them (it does, so the sampler need not scan 49,152 logits a row); None elsewhere."""
        best = getattr(self.model, "last_argmax", None)
        return None if best is None else best[:, -1].tolist()

    @torch.inference_mode()
    def verify(
        self, rows: list[list[int]], starts: list[int], slots: list[int] | None = None, provisional: bool = False
    ) -> Tensor:
        """Tokens for each of slots ``0..n-1`` from position ``starts[i]`` on (a token and its drafts,
        or what a draft model has not seen yet) -> logits ``[n, W, V]``, W the longest row. Shorter
        rows are padded with their last token past their end, where nothing reads the cache before
        it is rewritten; positions stop at the cache's end. ``slots`` names other slots than
        ``0..n-1`` (an R2R catch-up of only the flagged sequences). ``provisional``: how many of
        each row's tokens stay is told later, by ``commit`` (an H2O cache keeps no rejected draft)."""
        width, last = max(map(len, rows)), self.max_len - 1
        ids = torch.tensor([row + [row[-1]] * (width - len(row)) for row in rows], dtype=torch.long)
        pos = torch.tensor([[min(start + i, last) for i in range(width)] for start in starts], dtype=torch.long)
        index = None if slots is None else torch.tensor(slots, dtype=torch.long)
        batch = AttentionBatch.build(0, pos, index)
        batch.lengths = torch.tensor([len(row) for row in rows])
        batch.provisional = provisional and self.h2o is not None
        return self.model(ids, batch)

    @torch.inference_mode()
    def commit(self, kept: list[int]) -> None:
        """After a provisional ``verify``: the first ``kept[i]`` tokens of row i stand."""
        if (cache := self.h2o) is not None:  # a full cache overwrites rejected drafts before reading them
            cache.commit_pending(torch.tensor(kept))

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """The entries move with the pool's pages (``PagePool.move``, once for every model that
        shares it); an H2O cache's budget moves here."""
        if (cache := self.h2o) is not None:
            cache.copy_budget(src, dst)

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """The first ``length`` tokens of ``src``'s cache copied into ``dst`` (a shared prefix)."""
        self.pool.copy(src, dst, self.pool.max_len if self.h2o is not None else length)  # H2O: every entry
        if (cache := self.h2o) is not None:
            cache.copy_budget(src, dst)

    def kv_bytes_per_token(self) -> int:
        return sum(cache.bytes_per_token for cache in self.model.kv_caches)

    @property
    def slot_tokens(self) -> int:
        """Token entries each slot holds: ``max_len``, or an H2O budget's."""
        return self.kv.capacity(self.max_len)

    def slot_bytes(self) -> int:
        return self.slot_tokens * self.kv_bytes_per_token()
