"""The event loop every broker process runs on (config key ``event_loop``).

``uvloop`` (the default) is libuv's loop for asyncio. Measured in benchmarks/resolve_vs_check.py
(32 callers, 8 server processes per variant, interleaved): it took about 15% off the server CPU
of every call, the health Check and Resolve alike, and served about 11% more calls a second on
two cores. ``asyncio`` is the standard library's loop, for an operator who wants it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Kind = Literal["uvloop", "asyncio"]


def run(main: Coroutine[Any, Any, T], kind: Kind) -> T:
    """Run ``main`` to completion on a new loop of ``kind``, as asyncio.run does."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
