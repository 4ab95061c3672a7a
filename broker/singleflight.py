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
        self._tasks: dict[Hashable, asyncio.Task[T]] = {}
        self.coalesced = 0

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        else:
            self.coalesced += 1
        return await asyncio.shield(task)

    def _finished(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: every caller may have gone away

    def in_flight(self) -> int:
        return len(self._tasks)
