"""Single flight: concurrent callers asking for the same key share one in-progress call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """The first caller for a key starts the work; later callers await the same task.

    The work runs in its own task and every caller awaits it through ``asyncio.shield``, so
    one caller's cancellation never cancels the work or fails the other callers.
    """

    def __init__(self) -> None:
        # key -> (the work in flight, whether later callers may take its result)
        self._tasks: dict[Hashable, tuple[asyncio.Task[T], bool]] = {}
        self.coalesced = 0

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]], *, joinable: bool = True) -> T:
        """``work``'s result, or that of the same key's work in flight. ``joinable=False``: the
        work's result answers only its own caller (a background refresh that may give up
        without refreshing); a later caller waits for it to end, then runs its own, so the key
        still has one piece of work at a time."""
        while True:
            entry = self._tasks.get(key)
            if entry is None:
                task = asyncio.ensure_future(work())
                self._tasks[key] = (task, joinable)
                task.add_done_callback(lambda done: self._finished(key, done))
                return await asyncio.shield(task)
            running, shared = entry
            if shared:
                self.coalesced += 1
                return await asyncio.shield(running)
            await asyncio.wait([running])  # its result is not ours: then start our own

    def _finished(self, key: Hashable, task: asyncio.Task[T]) -> None:
        entry = self._tasks.get(key)
        if entry is not None and entry[0] is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: every caller may have gone away

    def in_flight(self) -> int:
        return len(self._tasks)
