"""Cross-process exclusion of a credential's refresh, for the service's async code.

The single flight coalesces refreshes within one process; this lock, taken from the store, makes
the refresh exclusive across every process sharing the store (worker processes, replicas), so a
rotating refresh token is presented once. Waiting happens in a worker thread and is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from broker.store.base import CredentialStore, RefreshLock


def _release_late(future: asyncio.Future[RefreshLock | None]) -> None:
    if not future.cancelled() and future.exception() is None:
        lock = future.result()
        if lock is not None:
            lock.release()


@contextlib.asynccontextmanager
async def refresh_lock(
    store: CredentialStore, user_id: str, upstream_key: str, timeout: float
) -> AsyncIterator[bool]:
    """Hold the store's refresh lock for (user, upstream); yields False if the wait timed out."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, store.lock_refresh, user_id, upstream_key, timeout)
    try:
        lock = await asyncio.shield(future)
    except asyncio.CancelledError:
        # The wait goes on in its thread: release the lock if it is granted after all.
        future.add_done_callback(_release_late)
        raise
    try:
        yield lock is not None
    finally:
        if lock is not None:
            await asyncio.shield(loop.run_in_executor(None, lock.release))
