"""H2O key/value cache: per KV head, the heavy hitters (largest accumulated attention) plus a
recent window, in a fixed number of entries per sequence.

Keys are stored after RoPE, so a kept key never needs re-rotating; each entry remembers its
position (``-1`` = empty), which is all the mask needs: every cached entry precedes the tokens of
the current step, and new tokens attend to each other causally. A step's attention is computed
here in PyTorch because the probabilities are needed: their column sums over the step's queries
(and over the query heads of a GQA group) are added to the scores of the keys they attended to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.model.kv_cache import AttentionBatch, token_bytes
from engine.model.kv_pool import DEFAULT_PAGE_SIZE, PagePool
from kernels import h2o

POLICIES = ("full", "h2o")
EVICTION_RULES = ("h2o", "h2o_mean", "recent", "random")
SINKS = 4  # attention-sink tokens (StreamingLLM): the first positions, which every query attends to


@dataclass(frozen=True)
class KVPolicy:
    """An expert's KV cache: ``full`` (every position) or ``h2o`` with a budget given either as
    ratios of each sequence's length or as a fixed number of tokens. ``evict`` picks what an
    over-budget cache drops: ``h2o`` (lowest accumulated attention), ``h2o_mean`` (lowest attention
    per query that could see the key, which does not favour old keys), or the baselines ``recent``
    (oldest first) and ``random``. Under every rule the first ``sinks`` positions are never
    evicted; they come out of the heavy hitters' share.

    The defaults (a quarter of the budget for the sinks and heavy hitters by mean attention,
    three quarters for the recent window) are the split that measured no worse than the recent
    window + 4 sinks at every length and budget of ``benchmarks/kv_cache.py --lengths``; the
    classic half-and-half split with summed scores was worse at 2,048 tokens and a 10% budget."""

    policy: str = "full"
    heavy_ratio: float = 0.05
    recent_ratio: float = 0.15
    budget_tokens: int | None = None
    evict: str = "h2o_mean"
    sinks: int = SINKS

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"kv_cache policy must be one of {POLICIES}, got {self.policy!r}")
        if self.heavy_ratio < 0 or self.recent_ratio <= 0 or self.heavy_ratio + self.recent_ratio > 1:
            raise ValueError("kv_cache needs heavy_ratio >= 0, recent_ratio > 0 and their sum <= 1")
        if self.budget_tokens is not None and self.budget_tokens < 8:
            raise ValueError("kv_cache budget_tokens must be at least 8")
        if self.evict not in EVICTION_RULES:
            raise ValueError(f"unknown eviction rule {self.evict!r}")
        if not 0 <= self.sinks < (self.budget_tokens or 16):  # fewer than the smallest budget
            raise ValueError("kv_cache sinks must be at least 0 and below the budget (16 entries with ratios)")

    @property
    def h2o(self) -> bool:
        return self.policy == "h2o"

    def capacity(self, max_len: int) -> int:
        """Entries per cache slot: the budget of the longest sequence the expert accepts."""
        if not self.h2o:
            return max_len
        if self.budget_tokens is not None:
            return min(self.budget_tokens, max_len)
        return min(max_len, self._share(max_len))

    def budget(self, length: int, max_len: int) -> tuple[int, int]:
        """(entries, recent window) for a sequence that can reach ``length`` tokens: with ratios,
        that share of its length (at least 16 entries); with ``budget_tokens``, that many."""
        cap = self.capacity(max_len)
        if self.budget_tokens is not None:
            entries = cap
        else:
            entries = min(cap, self._share(length))
        recent = max(1, round(entries * self.recent_ratio / (self.heavy_ratio + self.recent_ratio)))
        return entries, min(recent, entries - self.sinks)

    def _share(self, length: int) -> int:
        """The ratios' share of ``length`` tokens, at least 16 entries."""
        return max(16, math.ceil((self.heavy_ratio + self.recent_ratio) * length))

    def describe(self, max_len: int) -> dict[str, object]:
        out: dict[str, object] = {"policy": self.policy, "slot_tokens": self.capacity(max_len)}
        if self.h2o:
            out |= {"heavy_ratio": self.heavy_ratio, "recent_ratio": self.recent_ratio, "sinks": self.sinks}
            out |= {"budget_tokens": self.budget_tokens} if self.budget_tokens is not None else {}
        return out


@dataclass
class _Step:
    """A step's new entries in every layer, held until it is committed."""

    rows: slice | Tensor
    positions: Tensor  # [B, S]
    k: list[Tensor]  # per layer [B, KV, S, D]
    v: list[Tensor]
    # per layer, attention each key got: [B, KV, C + S] from the kept queries, or, for a
    # provisional step, [B, KV, S, C + S] from each query (how many are kept is not known yet)
    received: list[Tensor]


class H2OKVCache(nn.Module):
    """The whole model's cache, in the expert's KV pages: a sequence's ``capacity`` entries are the
    entries of its pages in order (``PagePool.table``), each page ``k``/``v`` ``[layers, kv_heads,
    page_size, D]`` with per entry its position and accumulated score ``[layers, kv_heads,
    page_size]``. A sequence holds the pages of its own budget: evictions compact within them, and
    an entry on a page it does not hold reads as empty.

    A forward pass's layers attend through ``layer(i)`` and leave their new keys, values and
    attention received; ``end_step`` then scores, inserts and evicts for all layers at once (a
    layer's new tokens are in hand while it attends, so nothing needs them in the cache sooner).
    """

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        policy: KVPolicy,
        max_len: int,
        pool: PagePool | None = None,
    ) -> None:
        """``pool``: the expert's pages (their table's rows are ``capacity`` entries long); without
        one, a pool that gives every slot its ``capacity`` entries."""
        super().__init__()
        self.policy, self.capacity = policy, policy.capacity(max_len)
        self.pool = pool or PagePool(0, DEFAULT_PAGE_SIZE, n_slots, self.capacity, dedicated=True)
        assert self.pool.max_len >= self.capacity, "the pool's rows must hold a slot's entries"
        size = self.pool.page_size
        self.n_layers, self.n_pages = n_layers, self.pool.pages_for(self.capacity)
        self.k = self.pool.buffer((n_layers, n_kv_heads, size, head_dim), dtype)
        self.v = self.pool.buffer((n_layers, n_kv_heads, size, head_dim), dtype)
        self.pos = self.pool.buffer((n_layers, n_kv_heads, size), torch.int32)
        self.score = self.pool.buffer((n_layers, n_kv_heads, size), torch.float32)
        self.pool.on_grant.append(self._clear)  # a page a sequence takes holds no entry of its yet
        self.budget = torch.zeros(n_slots, dtype=torch.long)  # entries each slot may hold
        self.recent = torch.ones(n_slots, dtype=torch.long)  # of which the newest this many always
        self.evicted_total = 0  # tokens evicted per sequence (every layer and head evicts as many)
        self.generator = torch.Generator().manual_seed(0)  # the random-eviction baseline's scores
        self._step: _Step | None = None
        self._pending: _Step | None = None

    # -- entries in pages ------------------------------------------------------------------------
    def _clear(self, pages: Tensor) -> None:
        self.pos[pages] = -1
        self.score[pages] = 0

    def _pages(self, slots: Tensor) -> Tensor:
        """The pages of ``slots`` ``[N]`` -> ``[N, pages]`` (the scratch page where one holds none)."""
        return self.pool.table[slots, : self.n_pages].long()

    def _read(self, buffer: Tensor, layer: int | Tensor, slots: Tensor) -> Tensor:
        """Entries ``0..capacity`` of ``slots`` in ``layer`` (one, or one per slot) -> ``[N, KV, C, ...]``."""
        pages = self._pages(slots)
        index = layer if isinstance(layer, int) else layer[:, None]
        return buffer[pages, index].transpose(1, 2).flatten(2, 3)[:, :, : self.capacity]

    def _positions(self, layer: int | Tensor, slots: Tensor) -> Tensor:
        """As ``_read`` of the positions, ``-1`` (empty) for entries on pages a slot does not hold."""
        pos = self._read(self.pos, layer, slots)
        held = (self._pages(slots) != self.pool.scratch).repeat_interleave(self.pool.page_size, dim=1)
        return torch.where(held[:, None, : self.capacity], pos, -1)

    def _store(self, buffer: Tensor, layer: Tensor, slots: Tensor, value: Tensor) -> None:
        """``value`` ``[N, KV, C, ...]`` into entries ``0..capacity`` of ``slots`` in ``layer`` (one per slot)."""
        rows, heads = value.shape[:2]
        room = self.n_pages * self.pool.page_size
        if room > self.capacity:  # the last page's tail past the capacity: never read
            value = torch.cat([value, value.new_zeros(rows, heads, room - self.capacity, *value.shape[3:])], dim=2)
        pages = value.unflatten(2, (self.n_pages, self.pool.page_size)).transpose(1, 2)
        buffer[self._pages(slots), layer[:, None]] = pages

    def _backed(self, at: _Rows) -> Tensor:
        """Each row's budget, within the entries its slot's pages hold (its pages grow with it)."""
        held = (self._pages(at.slot) != self.pool.scratch).sum(dim=1) * self.pool.page_size
        return torch.minimum(at.budget, held)

    def _entry(self, slot: Tensor, entry: Tensor) -> tuple[Tensor, Tensor]:
        """(page, offset) of entry ``entry`` of ``slot`` (elementwise)."""
        size = self.pool.page_size
        return self.pool.table[slot, entry // size].long(), entry % size

    def layer(self, index: int) -> H2OLayer:
        return H2OLayer(self, index)

    # -- a forward pass ---------------------------------------------------------------------------
    def begin(self, batch: AttentionBatch) -> None:
        rows, positions = batch.rows, batch.positions
        fresh = positions[:, 0] == 0  # a new sequence starts in this slot
        if bool(fresh.any()):
            pages = self._pages(self._slots(rows)[fresh])
            self.pos[pages] = -1
            self.score[pages] = 0
        self._step = _Step(rows, positions, [], [], [])

    def attend(self, layer: int, batch: AttentionBatch, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """``q [B, S, H, D]`` and the step's rotated ``k``/``v`` ``[B, S, KV, D]`` -> attention
        output ``[B, S, H * D]`` over the kept entries and the step's own tokens (causally)."""
        step = self._step
        assert step is not None, "begin() must run before attend()"
        rows, positions = batch.rows, batch.positions
        bsz, seq, n_heads, dim = q.shape
        kv_heads = k.shape[2]
        groups = n_heads // kv_heads
        new_k, new_v = k.transpose(1, 2), v.transpose(1, 2)  # [B, KV, S, D]
        # queries of a GQA group side by side: [B, KV, G * S, D], so no key is copied per head
        grouped = q.transpose(1, 2).reshape(bsz, kv_heads, groups * seq, dim)
        slots = self._slots(rows)
        cached = (self._positions(layer, slots) >= 0)[:, :, None, :]  # [B, KV, 1, C]
        causal = (positions[:, None, :] <= positions[:, :, None]).repeat(1, groups, 1)[:, None]  # [B, 1, G*S, S]
        keys = self._read(self.k, layer, slots)
        probs = h2o.attention_probs(grouped, keys, new_k, cached, causal, scale)  # [B, KV, G*S, C+S]
        capacity = self.capacity
        out = torch.matmul(probs[..., :capacity].to(new_v.dtype), self._read(self.v, layer, slots))
        out = out + torch.matmul(probs[..., capacity:].to(new_v.dtype), new_v)  # [B, KV, G * S, D]
        step.k.append(new_k)
        step.v.append(new_v)
        per_query = probs.view(bsz, kv_heads, groups, seq, -1)
        if batch.provisional:
            step.received.append(per_query.sum(dim=2))
        else:
            step.received.append(h2o.column_scores(per_query, _lengths(batch)))
        return out.view(bsz, n_heads, seq, dim).transpose(1, 2).reshape(bsz, seq, n_heads * dim)

    def end_step(self, batch: AttentionBatch) -> None:
        step, self._step = self._step, None
        assert step is not None and len(step.k) == self.n_layers, "every layer attends once per step"
        if batch.provisional:
            self._pending = step
            return
        self._commit(step, _lengths(batch))

    def commit_pending(self, kept: Tensor) -> None:
        """The last provisional step's first ``kept[b]`` tokens stand; the rest leave no trace."""
        assert self._pending is not None, "no provisional step to commit"
        step, self._pending = self._pending, None
        self._commit(step, kept)

    # -- scoring, insertion, eviction ----------------------------------------------------------
    def _slots(self, rows: slice | Tensor) -> Tensor:
        return torch.arange(self.pool.table.shape[0])[rows]

    def _commit(self, step: _Step, n_keep: Tensor) -> None:
        """Add the kept queries' attention to the scores, insert the kept tokens, evict to budget.
        All layers at once: the batch below is (layer, row) pairs, ``L * B`` of them."""
        n_layers = len(step.k)
        index = self._slots(step.rows)
        n_keep = n_keep.to(torch.long).repeat(n_layers)  # [L * B]
        received = torch.cat(step.received)
        if received.dim() == 4:  # a provisional step's per-query attention: count the kept queries
            received = h2o.column_scores(received.unsqueeze(2), n_keep)  # [L * B, KV, C + S]
        new = _New(torch.cat(step.k), torch.cat(step.v), step.positions.repeat(n_layers, 1), n_keep)
        layer = torch.arange(n_layers).repeat_interleave(len(index))
        slot = index.repeat(n_layers)
        budget, recent = self.budget[slot], self.recent[slot]
        newest = new.positions.gather(1, (n_keep - 1).clamp(min=0)[:, None])[:, 0]
        old_score, new_score = self._scores(layer, slot, received, new.positions)
        at = _Rows(layer, slot, newest, recent, budget)
        if new.positions.shape[1] <= int(recent.min()):  # all new tokens in the recent window: write in place
            evicted = self._write(at, new, old_score, new_score)
        else:
            evicted = self._regather(at, new, old_score, new_score)
        self.evicted_total += int(evicted[: len(index)].sum())  # the first layer's rows

    def _scores(self, layer: Tensor, slot: Tensor, received: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(the cached entries' scores, the new tokens' scores) after this step, by eviction rule."""
        capacity, rule = self.capacity, self.policy.evict
        old = self._read(self.score, layer, slot)  # [L * B, KV, C]
        shape = (positions.shape[0], received.shape[1], positions.shape[1])
        if rule in ("h2o", "h2o_mean"):
            return old + received[..., :capacity], received[..., capacity:]
        if rule == "recent":  # oldest goes first
            return old, positions[:, None, :].expand(shape).float()
        return old, torch.rand(shape, generator=self.generator)

    def _key(self, score: Tensor, pos: Tensor, at: _Rows) -> Tensor:
        """Eviction priority of ``score``/``pos`` ``[L * B, KV, N]`` under this cache's policy."""
        mean = self.policy.evict == "h2o_mean"
        return h2o.eviction_key(score, pos, at.newest, at.recent, self.policy.sinks, mean)

    def _write(self, at: _Rows, new: _New, old_score: Tensor, new_score: Tensor) -> Tensor:
        """Decode/verify: each kept new token takes an empty entry or the lowest-keyed one's."""
        layer, slot, budget = at.layer, at.slot, self._backed(at)
        rows, kv_heads, seq = new_score.shape
        old_pos = self._positions(layer, slot)
        targets = h2o.slots_to_write(self._key(old_score, old_pos, at), budget, seq)
        self._store(self.score, layer, slot, old_score)
        write = new.kept[:, None, :].expand(rows, kv_heads, seq)  # [L * B, KV, S]
        grid = (rows, kv_heads, seq)
        ll = layer[:, None, None].expand(grid)[write]
        bb = slot[:, None, None].expand(grid)[write]
        hh = torch.arange(kv_heads)[None, :, None].expand(grid)[write]
        page, ss = self._entry(bb, targets[write])
        evicted = (old_pos.gather(2, targets) >= 0) & write
        self.k[page, ll, hh, ss] = new.k[write]
        self.v[page, ll, hh, ss] = new.v[write]
        self.pos[page, ll, hh, ss] = new.positions[:, None, :].expand(grid)[write].to(torch.int32)
        self.score[page, ll, hh, ss] = new_score[write]
        return evicted[:, 0].sum(dim=-1)

    def _regather(self, at: _Rows, new: _New, old_score: Tensor, new_score: Tensor) -> Tensor:
        """A wide chunk: rank old entries and new tokens together and keep each row's budget."""
        layer, slot, budget = at.layer, at.slot, self._backed(at)
        rows, kv_heads, seq = new_score.shape
        new_pos = torch.where(new.kept, new.positions, -1)[:, None, :].expand(rows, kv_heads, seq)
        pos = torch.cat([self._positions(layer, slot).long(), new_pos], dim=2)
        score = torch.cat([old_score, new_score], dim=2)
        keep, valid = h2o.entries_to_keep(self._key(score, pos, at), budget, self.capacity)
        gather = keep[..., None].expand(-1, -1, -1, self.k.shape[-1])
        for buffer, fresh in ((self.k, new.k), (self.v, new.v)):
            kept = torch.cat([self._read(buffer, layer, slot), fresh], dim=2).gather(2, gather)
            self._store(buffer, layer, slot, kept)
        self._store(self.pos, layer, slot, torch.where(valid, pos.gather(2, keep), -1).to(torch.int32))
        self._store(self.score, layer, slot, torch.where(valid, score.gather(2, keep), 0.0))
        return (pos[:, 0] >= 0).sum(dim=-1) - valid[:, 0].sum(dim=-1)

    # -- slots ---------------------------------------------------------------------------------
    def positions(self, layer: int, slot: int) -> Tensor:
        """The positions ``slot`` keeps in ``layer``, ``[KV, C]`` (``-1``: an empty entry)."""
        return self._positions(layer, torch.tensor([slot]))[0]

    def copy_budget(self, src: int, dst: int) -> None:
        """Slot ``dst`` takes ``src``'s budget (its entries move, or are copied, with its pages)."""
        self.budget[dst], self.recent[dst] = self.budget[src], self.recent[src]

    def used_entries(self, live_slots: int | None = None) -> int:
        """Entries holding a token in slots ``0..live_slots-1`` (all by default), counted on the
        first layer and KV head (pages a finished sequence left are not cleared, only reused)."""
        slots = torch.arange(self.pool.table.shape[0])[:live_slots]
        return int((self._positions(0, slots)[:, 0] >= 0).sum())

    @property
    def bytes_per_token(self) -> int:
        _, layers, heads, _, dim = self.k.shape
        return token_bytes(layers, heads, dim, self.k.element_size(), h2o=True)


def _lengths(batch: AttentionBatch) -> Tensor:
    """How many of each row's new tokens are real (all, unless rows were padded)."""
    if batch.lengths is not None:
        return batch.lengths
    return torch.full((batch.positions.shape[0],), batch.positions.shape[1])


@dataclass
class _Rows:
    """The (layer, slot) pairs a commit updates, ``L * B`` of them, and each one's limits."""

    layer: Tensor
    slot: Tensor
    newest: Tensor  # position of the newest kept token
    recent: Tensor
    budget: Tensor


@dataclass
class _New:
    """A committed step's new tokens, stacked over layers: ``k``/``v`` ``[L * B, KV, S, D]``."""

    k: Tensor
    v: Tensor
    positions: Tensor  # [L * B, S]
    n_keep: Tensor  # [L * B]

    @property
    def kept(self) -> Tensor:
        return torch.arange(self.positions.shape[1])[None, :] < self.n_keep[:, None]  # [L * B, S]


class H2OLayer:
    """One layer's handle on the shared cache, what its attention module holds."""

    def __init__(self, cache: H2OKVCache, index: int) -> None:
        self.cache, self.index = cache, index

    def attend(self, batch: AttentionBatch, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return self.cache.attend(self.index, batch, q, k, v, scale)
