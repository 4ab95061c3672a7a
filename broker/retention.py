"""The reaper: deletes what the retention settings say may go, on a timer.

- Credentials that have needed reconnecting (needs_reauth) for longer than
  ``retention.needs_reauth_seconds`` (0, the default: kept). Each is deleted only if it still
  needs reconnecting since then (a reconnect meanwhile keeps it), with a DISCONNECTED event
  (``last_error`` "retention") in the same transaction. Nothing is revoked: the provider
  already refused its refresh token.
- Connection events older than ``events.retention_seconds`` or beyond the newest
  ``events.max_events``, through a mark the store keeps (``events_trimmed_through``): a
  watcher resuming below it is told to resynchronise (WATCH_RESYNC_REQUIRED).
- Expired connect flows are purged by broker/flow_purge.py on its own timer, audited there.

Every deletion is audited (action ``retention``): one record per credential (user, upstream),
one per batch of events (count, sequence); never a token. With ``retention.dry_run`` the same
records and log lines say what would go, and nothing is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from broker import events
from broker.audit import Auditor
from broker.clock import Clock
from broker.config import EventsConfig, RetentionConfig
from broker.errors import BrokerError
from broker.logs import fields, get_logger
from broker.store.base import CredentialStore

# Credentials looked at per query; a dry run reports at most this many per tick.
BATCH = 500


@dataclass
class RetentionReport:
    """What one reaper pass deleted (or, in a dry run, would delete)."""

    dry_run: bool
    #: (user, upstream name) of each credential.
    credentials: list[tuple[str, str]] = field(default_factory=list)
    #: How many events.
    events: int = 0


class Reaper:
    """A background task started and stopped with the server: every ``interval_seconds``,
    one :meth:`reap_once`."""

    def __init__(
        self,
        store: CredentialStore,
        clock: Clock,
        retention: RetentionConfig,
        event_retention: EventsConfig,
        names: dict[str, str],
        auditor: Auditor | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        """``names``: upstream key -> name, for the audit (a key no longer configured is
        reported as the key)."""
        self._store = store
        self._clock = clock
        self._retention = retention
        self._events = event_retention
        self._names = names
        self._audit = auditor or Auditor()
        self._log = logger or get_logger()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="retention")

    async def stop(self) -> None:
        """Stop the timer; a pass in progress finishes first (the store must outlive it)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._retention.interval_seconds)
            if self._stopping.is_set():
                return
            await asyncio.to_thread(self.reap_once)

    def reap_once(self) -> RetentionReport:
        """One pass (blocking: run it in a worker thread). A store failure is logged, never
        raised: what was done stays done, the next tick does the rest."""
        report = RetentionReport(self._retention.dry_run)
        try:
            self._credentials(report)
            self._old_events(report)
        except BrokerError as exc:
            self._log.warning("retention pass failed", extra=fields(error=exc.code))
        except Exception as exc:  # a bug must not end the timer for the life of the process
            self._log.error("retention pass failed", extra=fields(error=type(exc).__name__))
        return report

    def _credentials(self, report: RetentionReport) -> None:
        limit = self._retention.needs_reauth_seconds
        if limit <= 0:
            return
        now = self._clock.now()
        cutoff = now - limit
        dry = report.dry_run
        while True:
            found = self._store.needs_reauth_before(cutoff, BATCH)
            for user, key, _since in found:
                name = self._names.get(key, key)
                if not dry and not self._store.delete_needs_reauth(
                    user, key, cutoff, events.reaped(user, key, now)
                ):
                    continue  # reconnected (or deleted) meanwhile
                report.credentials.append((user, name))
                self._audit.record(
                    "retention",
                    "success",
                    user=user,
                    upstream=name,
                    reason="needs_reauth_expired",
                    detail={"kind": "credential", "dry_run": str(dry).lower()},
                )
                self._log.info(
                    "credential needing reconnection past retention "
                    + ("would be deleted (dry run)" if dry else "deleted"),
                    extra=fields(user_id=user, upstream=name),
                )
            if dry or len(found) < BATCH:
                return

    def _old_events(self, report: RetentionReport) -> None:
        before = self._clock.now() - self._events.retention_seconds
        through, count = self._store.events_to_trim(before, self._events.max_events)
        if count == 0:
            return
        dry = report.dry_run
        report.events = count if dry else self._store.trim_events(through)
        if report.events == 0:
            return
        self._audit.record(
            "retention",
            "success",
            reason="events_expired",
            detail={
                "kind": "events",
                "dry_run": str(dry).lower(),
                "count": str(report.events),
                "through_sequence": str(through),
            },
        )
        self._log.info(
            "old connection events " + ("would be deleted (dry run)" if dry else "deleted"),
            extra=fields(count=report.events, through_sequence=through),
        )
