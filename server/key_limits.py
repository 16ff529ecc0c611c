"""The arithmetic behind per-key limits: sliding 60 s windows (rpm, tpm), calendar budget periods
in UTC, and the spend book persisted beside the keys file. Clocks are injected, so tests need not
sleep; nothing here knows about HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Period = Literal["hour", "day", "week", "month", "total"]
WINDOW_S = 60.0  # rpm and tpm look back this far
SAVE_EVERY_S = 1.0  # the spend file is written at most this often (and at shutdown)


class SlidingWindow:
    """Amounts (1 per request, or tokens) added at moments; what the last ``span`` seconds hold.
    An amount added at ``t`` leaves the window at ``t + span``."""

    def __init__(self, span: float = WINDOW_S) -> None:
        self.span = span
        self._items: deque[tuple[float, int]] = deque()
        self._total = 0

    def total(self, now: float) -> int:
        while self._items and self._items[0][0] <= now - self.span:
            self._total -= self._items.popleft()[1]
        return self._total

    def add(self, now: float, amount: int) -> None:
        self.total(now)
        self._items.append((now, amount))
        self._total += amount

    def wait(self, now: float, amount: int, limit: int) -> float | None:
        """None when ``amount`` more fits under ``limit`` now; else the seconds until enough has
        left the window (infinite when ``amount`` alone is over ``limit``)."""
        excess = self.total(now) + amount - limit
        if excess <= 0:
            return None
        if amount > limit:
            return math.inf
        for moment, held in self._items:  # oldest first
            excess -= held
            if excess <= 0:
                return moment + self.span - now
        return self.span  # not reached: the items sum to more than the excess


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def period_start(period: Period, wall: float) -> str:
    """The start of the calendar period (UTC) holding the Unix time ``wall``, as ISO 8601;
    ``total`` has one period for ever."""
    if period == "total":
        return "total"
    now = datetime.fromtimestamp(wall, UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    day = hour.replace(hour=0)
    starts = {"hour": hour, "day": day, "week": day - timedelta(days=day.weekday()), "month": day.replace(day=1)}
    return starts[period].isoformat()


def spend_path(keys_file: Path) -> Path:
    """Where a keys file's spend is kept: ``<keys file>.spend.json`` beside it."""
    return keys_file.with_name(keys_file.name + ".spend.json")


class SpendBook:
    """USD each key name spent in its current period, as ``{name: {period start: usd}}`` in a JSON
    file (only the current period of each name is kept). Written atomically (a temporary file
    renamed over it), at most once a second, and by ``save()`` at shutdown."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.clock = path, clock
        self.spent: dict[str, dict[str, float]] = self._read()
        self._dirty, self._last_save = False, -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False  # a failed write is logged once, not on every charge

    def _read(self) -> dict[str, dict[str, float]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {str(n): {str(p): float(v) for p, v in by.items()} for n, by in data.items()}
        except (ValueError, AttributeError, TypeError) as exc:  # a damaged file: start again, say so
            log.error("spend file %s is unreadable (%s); spend starts from 0", self.path, exc)
            return {}

    def get(self, name: str, start: str) -> float:
        return self.spent.get(name, {}).get(start, 0.0)

    def add(self, name: str, start: str, usd: float) -> None:
        self.spent[name] = {start: self.get(name, start) + usd}  # an older period is dropped
        self._dirty = True
        self._save_soon()

    def _save_soon(self) -> None:
        if self._timer is not None or self.path is None:
            return
        wait = self._last_save + SAVE_EVERY_S - self.clock()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script, a unit test): now
            wait = 0.0
        if wait <= 0:
            self.save()
        else:
            self._timer = loop.call_later(wait, self._timed_save)

    def _timed_save(self) -> None:
        self._timer = None
        self.save()

    def save(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._dirty or self.path is None:
            return
        self._last_save, self._dirty = self.clock(), False
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(self.spent, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self._failed = False
        except OSError as exc:  # e.g. a read-only directory (a Kubernetes Secret volume)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if not self._failed:
                log.warning("cannot write the spend file %s (%s): spend is kept in memory only", self.path, exc)
            self._failed = True
