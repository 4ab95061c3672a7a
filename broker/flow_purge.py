"""Deletes expired pending connect flows on a timer, so the store stays small between inserts.

Without it, expired flows leave only when a new flow is inserted; a burst of flows for many users
would then sit in the store until the next burst. After a purge that deleted something, the store
is asked to give the space back (SQLite's incremental vacuum; PostgreSQL's autovacuum does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from broker.audit import Auditor
from broker.clock import Clock
from broker.errors import BrokerError
from broker.logs import fields, get_logger
from broker.store.base import CredentialStore


class FlowPurger:
    """A background task started and stopped with the server: every ``interval`` seconds,
    delete the flows expired at ``clock.now()`` and reclaim their space."""

    def __init__(
        self,
        store: CredentialStore,
        clock: Clock,
        interval: float,
        logger: logging.Logger | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._store = store
        self._clock = clock
        self._interval = interval
        self._log = logger or get_logger()
        self._audit = auditor
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Flows deleted since start (for tests and diagnostics).
        self.purged = 0

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="flow-purge")

    async def stop(self) -> None:
        """Stop the timer. A purge in progress finishes first (it runs in a worker thread, and
        the store must not be closed under it)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            if self._stopping.is_set():
                return
            await asyncio.to_thread(self.purge_once)

    def purge_once(self) -> int:
        """One purge; how many flows it deleted. A store failure is logged, never raised: the
        next tick tries again."""
        try:
            purged = self._store.purge_expired_flows(self._clock.now())
            if purged:
                self._store.reclaim_space()
        except BrokerError as exc:
            self._log.warning("purging expired connect flows failed", extra=fields(error=exc.code))
            return 0
        except Exception as exc:  # a bug must not end the timer for the life of the process
            self._log.error("purging expired connect flows failed", extra=fields(error=type(exc).__name__))
            return 0
        if purged:
            self.purged += purged
            self._log.info("expired connect flows purged", extra=fields(count=purged))
            if self._audit is not None:  # retention's record of what it deleted (no secret)
                self._audit.record(
                    "retention",
                    "success",
                    reason="flows_expired",
                    detail={"kind": "flows", "count": str(purged)},
                )
        return purged
