"""Continuous batching: who waits, who prefills, who decodes, which cache slot each holds, and
(with a KV pool) which pages.

Decoding sequences always occupy the contiguous slots ``0 .. n-1`` so a decode step's rows are the
slots in order; the one sequence whose prompt is part-way through a chunked prefill sits at slot
``n``. When a sequence leaves, its pages go back to the pool and the last decoding sequence moves
into its slot (its pages go with it: a page-table row, no data).

With a pool, a waiting sequence is admitted when its prompt's pages are free beyond a reserve of
one page per decoding sequence (what each may need next); before a decode pass every sequence
gets the pages the pass writes, and where too few are free the newest arrival is preempted: its
pages are freed and it waits at the head of the queue, to be prefilled again (prompt and the
tokens it generated) when pages return, as vLLM's recompute preemption does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from engine.model.kv_pool import PagePool
from engine.sequence import Sequence

MoveSlot = Callable[[int, int, int], None]  # (src, dst, length)
Held = Callable[[Sequence, int], int]  # (seq, tokens) -> the entries it holds with that many tokens


def _all_of(seq: Sequence, tokens: int) -> int:
    return tokens


class Scheduler:
    def __init__(self, max_slots: int, move_slot: MoveSlot, pool: PagePool | None = None, held: Held = _all_of) -> None:
        """``held``: the cache entries a sequence of so many tokens holds (all of them, or an H2O
        budget's at most)."""
        self.max_slots = max_slots
        self._move_slot = move_slot
        self.pool = pool
        self._held = held
        self.waiting: deque[Sequence] = deque()
        self.decoding: list[Sequence] = []  # index == slot
        self.prefilling: Sequence | None = None  # at slot len(decoding)
        self.preemptions = 0  # since start

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.decoding or self.prefilling)

    @property
    def num_running(self) -> int:
        return len(self.decoding) + (self.prefilling is not None)

    def next_prefill(self, budget: int) -> tuple[Sequence, int, int] | None:
        """The next prompt chunk to prefill, ``(seq, start, end)``, within ``budget`` tokens."""
        if budget <= 0:
            return None
        if self.prefilling is None:
            if not self.waiting or len(self.decoding) >= self.max_slots or not self._admit(self.waiting[0]):
                return None
            seq = self.waiting.popleft()
            seq.slot = len(self.decoding)
            self.prefilling = seq
        seq = self.prefilling
        start = seq.num_computed
        return seq, start, min(seq.prefill_target, start + budget)

    def _admit(self, seq: Sequence) -> bool:
        """Give ``seq`` the pages of its prompt (and its first decoded token) if they are free
        beyond the decoding sequences' reserve; False (nothing taken) if not."""
        pool, slot = self.pool, len(self.decoding)
        if pool is None:
            return True
        tokens = self._held(seq, seq.prefill_target + 1)
        if pool.needed(slot, tokens) > pool.num_free - len(self.decoding):
            return False
        pool.grow(slot, tokens)
        return True

    def prefill_done(self, seq: Sequence) -> None:
        assert seq is self.prefilling and seq.slot == len(self.decoding)
        self.prefilling = None
        self.decoding.append(seq)

    def reserve(self, lookahead: int) -> list[Sequence]:
        """Pages for every decoding sequence's next pass (its tokens so far plus ``lookahead``
        drafts); where too few are free, the newest arrivals are preempted (a prefilling sequence
        first counts as running too). Returns the preempted sequences."""
        pool = self.pool
        if pool is None:
            return []
        preempted = []
        while True:
            need = sum(pool.needed(s.slot, self._held(s, _next_pass(s, lookahead))) for s in self.decoding)
            if need <= pool.num_free or not self.decoding:
                break
            victim = max([*self.decoding, *([self.prefilling] if self.prefilling else [])], key=_arrival)
            self.preempt(victim)
            preempted.append(victim)
        for s in self.decoding:
            pool.grow(s.slot, self._held(s, _next_pass(s, lookahead)))
        return preempted

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s pages and put it back at the head of the queue, to be recomputed."""
        self.remove(seq)
        seq.preempt()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is (its pages back to the pool), keeping decoding slots
        contiguous."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        if self.pool is not None:
            self.pool.release(seq.slot)
        if seq is self.prefilling:
            self.prefilling = None
            return
        slot = self.decoding.index(seq)
        last = self.decoding.pop()
        if last is not seq:
            self._move(last, slot)
            self.decoding[slot] = last
        if self.prefilling is not None:
            self._move(self.prefilling, len(self.decoding))

    def _move(self, seq: Sequence, slot: int) -> None:
        self._move_slot(seq.slot, slot, seq.num_computed)
        seq.slot = slot

    def tokens_held(self) -> int:
        """Tokens the running sequences hold in the cache."""
        return sum(s.num_computed for s in self.decoding) + (self.prefilling.num_computed if self.prefilling else 0)

    def all(self) -> list[Sequence]:
        rest = [self.prefilling] if self.prefilling else []
        return [*self.decoding, *rest, *self.waiting]


def _next_pass(seq: Sequence, lookahead: int) -> int:
    """Tokens ``seq`` holds after its next pass: its last token and up to ``lookahead`` drafts,
    never past its own limit (a padded row's extra positions write the scratch page)."""
    return min(len(seq.token_ids) + lookahead, seq.num_prompt + seq.request.params.max_tokens)


def _arrival(seq: Sequence) -> tuple[float, str]:
    return seq.request.arrival_time, seq.request_id
