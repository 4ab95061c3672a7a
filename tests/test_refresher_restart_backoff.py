"""The refresher's child process (broker/refresh_process.py) restarted after it dies: the backoff
doubles while it keeps dying young, and starts again from its first step once a child has lived
longer than the longest backoff (a crash a day later is not treated as part of an old crash
loop). Real processes: a real app's real ``python -m broker.refresh_worker`` child, SIGKILLed as
the OOM killer would."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import broker.refresh_process as refresh_process
from tests.conftest import BrokerFactory
from tests.test_refresh_process import CHILD, _child_of, _stat, _until

BACKOFF = (0.5, 4.0)  # first step, cap: the test's scale for 1 s doubling to 60 s


async def _kill_and_time_restart(refresher: refresh_process.RefresherProcess) -> float:
    """SIGKILL the running child; seconds until its successor is started."""
    pid, starts = refresher.pid, refresher.starts
    assert pid is not None and _stat(pid) is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    await _until(lambda: refresher.starts == starts + 1, timeout=20)
    return time.monotonic() - killed


async def test_a_child_that_lived_long_is_restarted_after_the_first_backoff_step(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refresh_process, "RESTART_BACKOFF_SECONDS", BACKOFF)
    broker = await make_broker(background_refresh=CHILD)
    refresher = _child_of(broker)
    await _until(lambda: refresher.pid is not None and _stat(refresher.pid) is not None)
    # A crash loop: each child dies young, the backoff climbs to its cap.
    waits = [await _kill_and_time_restart(refresher) for _ in range(4)]
    assert waits[-1] >= BACKOFF[1] * 0.9, waits
    # The next child lives longer than the longest backoff, then dies once.
    await asyncio.sleep(BACKOFF[1] + 1.0)
    wait = await _kill_and_time_restart(refresher)
    print(f"\ncrash loop waits {[round(w, 2) for w in waits]}; after a long life {wait:.2f} s")
    assert wait < BACKOFF[0] + 1.0, wait
