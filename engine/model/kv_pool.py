"""An expert's KV pool: fixed-size pages of token entries, handed to sequences as they grow.

Every model of an expert (the target, a draft model, R2R's large model) keeps its keys and values
in pages with the same numbers, so one page table serves them all: row ``slot`` of ``table`` lists
the pages of the sequence in that batch slot, in order, and its position ``p`` lives at entry
``p % page_size`` of page ``table[slot, p // page_size]``. Table entries past a sequence's pages
name the scratch page (the last one), which a padded row of a pass may write and nothing reads.

Each model's pages live in one anonymous memory mapping, page-major, so the OS maps a page only
when it is first written: resident memory follows the tokens held, not the pool's size. Pages are
handed out lowest first, so what was ever written stays the pool's high-water mark, and ``trim``
gives free pages back to the OS (the engine calls it when it goes idle).
"""

from __future__ import annotations

import heapq
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_PAGE_SIZE = 16


class PoolExhausted(RuntimeError):
    """Not enough free pages for what was asked (nothing was allocated)."""


@dataclass(frozen=True)
class PageLayout:
    """One model's share of a page: its layers, KV heads, head size and element type, and bytes an
    entry carries beside its key and value (an H2O cache's position and score: 8)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    extra_bytes: int = 0

    def page_bytes(self, page_size: int) -> int:
        """Keys and values (and extras) of ``page_size`` tokens over every layer and KV head."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.n_layers * self.n_kv_heads * page_size * (2 * self.head_dim * element + self.extra_bytes)


class PagedBuffer:
    """``[pages + 1, *per_page]`` of ``dtype`` in one private anonymous mapping: zero until written
    (the last page is the scratch page), and a discarded page really goes back to the OS (a shared
    mapping would keep it in shmem)."""

    def __init__(self, n_pages: int, per_page: tuple[int, ...], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.page_bytes = math.prod(per_page) * torch.empty((), dtype=dtype).element_size()
        self._map = mmap.mmap(-1, (n_pages + 1) * self.page_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.data = torch.frombuffer(self._map, dtype=dtype).view(n_pages + 1, *per_page)

    def discard(self, pages: list[int]) -> None:
        """Give ``pages`` back to the OS (they read as zeros when next written): whole OS pages
        inside each run of consecutive pages."""
        for first, count in _runs(sorted(pages)):
            start = -(-first * self.page_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
            end = (first + count) * self.page_bytes // mmap.PAGESIZE * mmap.PAGESIZE
            if end > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class PageStorage(PagedBuffer):
    """One model's keys and values for every page, ``[pages + 1, layers, 2, kv_heads, page_size,
    head_dim]``, page-major."""

    def __init__(self, layout: PageLayout, n_pages: int, page_size: int) -> None:
        self.layout, self.page_size = layout, page_size
        per_page = (layout.n_layers, 2, layout.n_kv_heads, page_size, layout.head_dim)
        super().__init__(n_pages, per_page, layout.dtype)

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """A layer's keys and values, each ``[pages + 1, kv_heads, page_size, head_dim]`` (a view
        whose pages are ``layers * 2`` heads' worth apart)."""
        return self.data[:, index, 0], self.data[:, index, 1]


class PagePool:
    """The pages of an expert's KV pool and the table of which slot holds which.

    ``dedicated=True`` gives every slot its ``max_len`` tokens of pages up front, for a runner used
    on its own (tests, benchmarks, training), where nothing asks for pages as sequences grow."""

    def __init__(self, n_pages: int, page_size: int, n_slots: int, max_len: int, dedicated: bool = False) -> None:
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"kv_cache page_size must be a power of two, got {page_size}")
        self.page_size, self.max_len = page_size, max_len
        self.pages_per_seq = math.ceil(max_len / page_size)
        if dedicated:
            n_pages = n_slots * self.pages_per_seq
        if n_pages < 1:
            raise ValueError("a KV pool needs at least one page")
        self.n_pages = n_pages
        self.scratch = n_pages  # the page past the pool's own
        self.table = torch.full((n_slots, self.pages_per_seq), self.scratch, dtype=torch.int32)
        self.held: list[list[int]] = [[] for _ in range(n_slots)]
        self._free = list(range(n_pages))  # a heap: lowest first
        self._released: set[int] = set()  # freed since the last trim
        self.storages: list[PagedBuffer] = []
        self.on_grant: list[Callable[[Tensor], None]] = []  # told each slot's new pages (an H2O cache clears them)
        self.dedicated = dedicated
        if dedicated:
            for slot in range(n_slots):
                self.grow(slot, max_len)

    @classmethod
    def sized(
        cls, memory_bytes: float, layouts: list[PageLayout], page_size: int, n_slots: int, max_len: int
    ) -> PagePool:
        """As many pages as ``memory_bytes`` holds for every model of the expert together."""
        per_page = sum(layout.page_bytes(page_size) for layout in layouts)
        return cls(int(memory_bytes // per_page), page_size, n_slots, max_len)

    def storage(self, layout: PageLayout) -> PageStorage:
        """A model's keys and values for this pool's pages (kept, so ``trim`` reaches it)."""
        store = PageStorage(layout, self.n_pages, self.page_size)
        self.storages.append(store)
        return store

    def buffer(self, per_page: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Another ``[pages + 1, *per_page]`` tensor in this pool's pages (an H2O cache's keys,
        values, positions and scores), kept so ``trim`` reaches it."""
        store = PagedBuffer(self.n_pages, per_page, dtype)
        self.storages.append(store)
        return store.data

    # -- pages of a slot ------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.n_pages - len(self._free)

    def needed(self, slot: int, tokens: int) -> int:
        """Pages ``slot`` lacks to hold ``tokens`` tokens."""
        return max(0, self.pages_for(min(tokens, self.max_len)) - len(self.held[slot]))

    def grow(self, slot: int, tokens: int) -> None:
        """Make ``slot`` hold at least ``tokens`` tokens (up to ``max_len``); raises PoolExhausted,
        allocating nothing, when too few pages are free."""
        need = self.needed(slot, tokens)
        if need > len(self._free):
            raise PoolExhausted(f"{need} pages wanted, {len(self._free)} free")
        held = self.held[slot]
        granted = []
        for _ in range(need):
            page = heapq.heappop(self._free)
            self._released.discard(page)
            self.table[slot, len(held)] = page
            held.append(page)
            granted.append(page)
        if granted:
            for hook in self.on_grant:
                hook(torch.tensor(granted))

    def release(self, slot: int) -> None:
        """Return ``slot``'s pages to the pool."""
        for page in self.held[slot]:
            heapq.heappush(self._free, page)
            self._released.add(page)
        self.held[slot] = []
        self.table[slot] = self.scratch

    def release_all(self) -> None:
        """Every slot's pages back (an engine starting over after a failed step)."""
        if not self.dedicated:
            for slot in range(len(self.held)):
                self.release(slot)

    def move(self, src: int, dst: int) -> None:
        """The sequence in ``src`` now sits in ``dst`` (empty): its pages go with it, no data moves."""
        if src == dst:
            return
        assert not self.held[dst] or self.dedicated, f"slot {dst} still holds pages"
        if self.dedicated:  # every slot keeps a full set: swap them
            self.held[src], self.held[dst] = self.held[dst], self.held[src]
            self.table[[src, dst]] = self.table[[dst, src]]
            return
        self.held[dst], self.held[src] = self.held[src], []
        self.table[dst] = self.table[src]
        self.table[src] = self.scratch

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` tokens of ``src`` into ``dst`` (which gets the pages it
        lacks), in every model's storage: a shared prefix, not recomputed."""
        self.grow(dst, length)
        n = self.pages_for(length)
        source, target = self.table[src, :n].long(), self.table[dst, :n].long()
        for store in self.storages:
            store.data[target] = store.data[source]

    def trim(self) -> None:
        """Give the pages freed since the last trim back to the OS, in every model's storage."""
        if not self._released:
            return
        pages, self._released = sorted(self._released), set()
        for store in self.storages:
            store.discard(pages)

    # -- reporting ------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.n_pages * self.page_size

    @property
    def page_bytes(self) -> int:
        """A page's bytes over every model of the expert."""
        return sum(store.page_bytes for store in self.storages)

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self.storages)


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers -> (first, count) of each run of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs
