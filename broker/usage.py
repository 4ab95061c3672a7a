"""The last-used stamp of a credential (ListConnections' ``last_used_at``), kept cheap for Resolve.

Resolve calls :meth:`UsageStamps.used` on every answer. It costs one dict lookup while the
credential's stamp is fresh: this process writes at most once per ``interval`` per credential,
and the write itself is a conditional UPDATE (``touch_last_used``) that also does nothing when
another replica stamped it within the interval. The write runs in a worker thread, never on the
Resolve path: the call returns before it starts. At most ``max_in_flight`` writes are pending;
beyond that a stamp is skipped (and tried again on a later Resolve), so a store that stalls
cannot pile up work. A failed write is logged and forgotten: the stamp is advisory.
"""

from __future__ import annotations

import asyncio
import logging

from broker.errors import BrokerError
from broker.logs import fields, get_logger
from broker.store.base import CredentialStore

#: Seconds between two stamps of one credential ("at most once a minute").
STAMP_INTERVAL_SECONDS = 60.0


class UsageStamps:
    """Throttled last_used_at writes for Resolve."""

    def __init__(
        self,
        store: CredentialStore,
        interval: float = STAMP_INTERVAL_SECONDS,
        max_tracked: int = 100_000,
        max_in_flight: int = 16,
        logger: logging.Logger | None = None,
    ) -> None:
        self._store = store
        self._interval = interval
        self._max_tracked = max_tracked
        self._max_in_flight = max_in_flight
        self._log = logger or get_logger()
        self._stamped: dict[tuple[str, str], float] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        #: Stamps written to the store since start (for tests and diagnostics).
        self.written = 0

    def used(self, user_id: str, upstream_key: str, now: float) -> None:
        """Note a Resolve of (user, upstream) at ``now``; writes only when the last stamp this
        process made is at least ``interval`` old. Never blocks, never raises."""
        key = (user_id, upstream_key)
        last = self._stamped.get(key)
        if last is not None and now - last < self._interval:
            return
        if len(self._in_flight) >= self._max_in_flight:
            return
        if len(self._stamped) >= self._max_tracked:
            self._stamped.clear()  # bounded memory; the conditional UPDATE still throttles
        self._stamped[key] = now
        task = asyncio.get_running_loop().create_task(self._write(user_id, upstream_key, now))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _write(self, user_id: str, upstream_key: str, now: float) -> None:
        try:
            if await asyncio.to_thread(
                self._store.touch_last_used, user_id, upstream_key, now, now - self._interval
            ):
                self.written += 1
        except BrokerError as exc:
            self._log.warning("recording a credential's last use failed", extra=fields(error=exc.code))
        except Exception as exc:  # advisory: a bug here must never reach a Resolve
            self._log.error(
                "recording a credential's last use failed", extra=fields(error=type(exc).__name__)
            )

    async def drain(self) -> None:
        """Wait for the writes in flight (shutdown, before the store closes; tests)."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
