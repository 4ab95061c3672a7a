"""Time, injected: production uses :class:`SystemClock`; tests pass a :class:`ManualClock`."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Seconds since the epoch, as a float."""

    def now(self) -> float: ...


class SystemClock:
    """The wall clock."""

    # time.time itself, not a method that calls it: read twice on every Resolve.
    now = staticmethod(time.time)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
