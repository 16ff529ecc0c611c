"""Continuous batching: who waits, who prefills, who decodes, and which cache slot each holds.

Decoding sequences always occupy the contiguous slots ``0 .. n-1`` so a decode step reads the
cache as a plain view; the one sequence whose prompt is part-way through a chunked prefill sits
at slot ``n``. When a sequence leaves, the last decoding sequence moves into its slot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from engine.sequence import Sequence

MoveSlot = Callable[[int, int, int], None]  # (src, dst, length)


class Scheduler:
    def __init__(self, max_slots: int, move_slot: MoveSlot) -> None:
        self.max_slots = max_slots
        self._move_slot = move_slot
        self.waiting: deque[Sequence] = deque()
        self.decoding: list[Sequence] = []  # index == slot
        self.prefilling: Sequence | None = None  # at slot len(decoding)

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
            if not self.waiting or len(self.decoding) >= self.max_slots:
                return None
            seq = self.waiting.popleft()
            seq.slot = len(self.decoding)
            self.prefilling = seq
        seq = self.prefilling
        start = seq.num_computed
        return seq, start, min(seq.num_prompt, start + budget)

    def prefill_done(self, seq: Sequence) -> None:
        assert seq is self.prefilling and seq.slot == len(self.decoding)
        self.prefilling = None
        self.decoding.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is, keeping decoding slots contiguous."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
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

    def all(self) -> list[Sequence]:
        rest = [self.prefilling] if self.prefilling else []
        return [*self.decoding, *rest, *self.waiting]
