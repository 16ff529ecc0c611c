"""Admission control: each expert's bounded wait queue, decided before any byte of a response.

An expert runs ``slots`` sequences at once (its ``max_batch_size``); beyond them at most
``max_waiting_requests`` sequences wait, and the prompts waiting to start hold at most
``max_waiting_tokens`` tokens. A request (``n`` choices count as ``n`` sequences) that would pass
either bound is refused with 503 and a ``Retry-After`` estimated from how fast the queue has been
draining, before its response starts: a client (the official SDKs retry 503 and 429, honouring
``Retry-After``) or a load balancer can go elsewhere, and the requests admitted keep a latency the
bound limits.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.errors import APIError, retry_later

DRAIN_WINDOW_S = 60.0  # finished sequences over this window give the drain rate
RETRY_AFTER_MAX_S = 60
RETRY_AFTER_UNKNOWN_S = 2  # nothing has finished yet: no rate to estimate from


@dataclass(frozen=True)
class QueueBounds:
    slots: int  # sequences the expert runs at once
    max_waiting_requests: int  # sequences beyond them that may wait
    max_waiting_tokens: int  # prompt tokens of sequences admitted and not yet started


@dataclass
class Ticket:
    """One admitted request: its sequences' prompts count as queued until each one starts."""

    queue: AdmissionQueue
    sizes: list[int]  # prompt tokens per sequence
    started: set[int] = field(default_factory=set)
    released: bool = False

    def start(self, index: int) -> None:
        """Sequence ``index`` produced its first output: its prompt is no longer queued."""
        if not self.released and index not in self.started:
            self.started.add(index)
            self.queue.queued_tokens -= self.sizes[index]

    def release(self) -> None:
        """The request is over (finished, failed, timed out or abandoned); idempotent."""
        if self.released:
            return
        self.released = True
        queue = self.queue
        queue.outstanding -= len(self.sizes)
        queue.queued_tokens -= sum(s for i, s in enumerate(self.sizes) if i not in self.started)
        queue.finished(len(self.sizes))


class AdmissionQueue:
    """One expert's count of admitted sequences, and the rate at which they finish."""

    def __init__(self, name: str, bounds: QueueBounds, clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.bounds, self.clock = name, bounds, clock
        self.outstanding = 0  # sequences admitted and not yet released (running or waiting)
        self.queued_tokens = 0  # prompt tokens of admitted sequences that have not started
        self._done: deque[tuple[float, int]] = deque()  # (time, sequences) finished in the window

    @property
    def waiting(self) -> int:
        return max(0, self.outstanding - self.bounds.slots)

    def admit(self, prompt_tokens: list[int]) -> Ticket:
        """A ticket for a request of these sequences, or a 503 (400 if it can never fit)."""
        n, bounds = len(prompt_tokens), self.bounds
        if n > bounds.slots + bounds.max_waiting_requests:
            message = (
                f"n={n} sequences is more than the model '{self.name}' admits at once "
                f"({bounds.slots} running + {bounds.max_waiting_requests} waiting)"
            )
            raise APIError(400, message, param="n", code="too_many_sequences")
        if self.outstanding + n > bounds.slots + bounds.max_waiting_requests:
            waiting = f"{self.waiting} requests are waiting (max_waiting_requests {bounds.max_waiting_requests})"
            raise self._overloaded(waiting)
        tokens = sum(prompt_tokens)
        if self.queued_tokens > 0 and self.queued_tokens + tokens > bounds.max_waiting_tokens:
            raise self._overloaded(
                f"{self.queued_tokens} prompt tokens are waiting (max_waiting_tokens {bounds.max_waiting_tokens})"
            )
        self.outstanding += n
        self.queued_tokens += tokens
        return Ticket(self, list(prompt_tokens))

    def finished(self, sequences: int) -> None:
        self._done.append((self.clock(), sequences))

    def retry_after_s(self) -> int:
        """Seconds until the queue has drained by this request's share, from the recent drain rate."""
        now = self.clock()
        while self._done and now - self._done[0][0] > DRAIN_WINDOW_S:
            self._done.popleft()
        if not self._done:
            return RETRY_AFTER_UNKNOWN_S
        span = max(now - self._done[0][0], 1.0)
        rate = sum(n for _, n in self._done) / span  # sequences finished per second
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil((self.waiting + 1) / rate)))

    def _overloaded(self, why: str) -> APIError:
        retry = self.retry_after_s()
        message = f"The model '{self.name}' is overloaded: {why}. Retry after {retry} s."
        return retry_later(message, "queue_full", retry, type="server_overloaded")
