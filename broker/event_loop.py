"""The event loop every broker process runs on (config key ``event_loop``).

``uvloop`` (the default) is libuv's loop for asyncio. Measured in benchmarks/resolve_vs_check.py
(32 callers; four server processes per loop, interleaved, two 6-round blocks each): it took
about 15% off the server CPU of every call, the health Check and Resolve alike, and served about
11% more calls a second on two cores. ``asyncio`` is the standard library's loop, for an
operator who wants it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from broker.errors import ConfigError

T = TypeVar("T")
Kind = Literal["uvloop", "asyncio"]


def run(main: Coroutine[Any, Any, T], kind: Kind) -> T:
    """Run ``main`` to completion on a new loop of ``kind``, as asyncio.run does."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError(
                "event_loop: uvloop is not installed here; install it or set event_loop: asyncio"
            ) from None
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
