"""Connection events: what changed about a user's connection, written with the change and
streamed to WatchConnections watchers on every replica.

Writing: the use cases build an event here (:func:`connected`, :func:`refreshed`,
:func:`refresh_failed`, :func:`disconnected`) and hand it to the store call that makes the
change; the store appends it in the same transaction, so an event exists exactly when its change
was committed. Its sequence is assigned by the store, in commit order (SQLite serializes
writers; PostgreSQL takes a transaction-scoped lock for the insert). An event carries the user,
the upstream, the kind, the new status and an error class: never a token.

Delivering: one :class:`EventHub` per process follows the event table from the highest sequence
it has seen (one indexed read per wake-up) and fans new events out to its watchers. It is woken
by PostgreSQL's NOTIFY (sent in the writing transaction, delivered on commit to every replica's
LISTEN connection) and otherwise polls: every ``poll_seconds`` on SQLite (a primary-key range
read that finds nothing costs microseconds), and every few seconds on PostgreSQL as a fallback.
The hub also keeps this process's Resolve read cache honest (broker/vault.py): each event read
drops that credential's remembered read, so another process's change is seen within a poll or a
notification, not a cache window. While there is a read cache the hub reads even with no
watcher, at least twice per cache window; with no watcher waiting, at most once per
``EVENT_READ_GAP_SECONDS`` (a refresh herd's notifications are then read in batches).
A watcher that names ``after_sequence`` first reads what it missed from the table, then follows
the hub; events are delivered once each, in sequence order. Retention (broker/retention.py)
deletes old events and keeps a mark of the highest sequence it deleted: a watcher resuming
below that mark is refused with WatchResyncRequired (OUT_OF_RANGE) rather than silently
missing events, and must resynchronise with ListConnections. Each watcher has a bounded queue:
one that falls that far behind is cut off (WatcherTooSlow, RESOURCE_EXHAUSTED), so a slow
reader cannot grow the broker's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from broker import validation
from broker.errors import (
    BrokerError,
    CallerNotPermitted,
    InvalidArgument,
    StoreError,
    UnknownUpstream,
    WatcherTooSlow,
    WatchResyncRequired,
)
from broker.logs import fields, get_logger
from broker.models import Credential, CredentialStatus
from broker.store.base import ConnectionEventRow, CredentialStore

# Events read from the store per query.
PAGE = 500
# Events that may wait for one watcher before it is cut off.
WATCHER_QUEUE = 1024
# How often the hub looks for new events: SQLite (no notifications across processes), and
# PostgreSQL as a fallback to NOTIFY (a lost listen connection).
EVENT_POLL_SECONDS = 0.1
EVENT_FALLBACK_POLL_SECONDS = 2.0
# With a read cache to keep honest and no watcher waiting: the least time between two reads of
# the event table (at most a quarter of the cache's window).
EVENT_READ_GAP_SECONDS = 0.1


class ReadCache(Protocol):
    """What the hub tells Resolve's read cache (broker/vault.py's CredentialVault)."""

    @property
    def read_cache_seconds(self) -> float: ...

    def changed(self, user_id: str, upstream_key: str) -> None: ...

    def followed_through(self, started: float) -> None: ...


class EventKind(StrEnum):
    """What happened (the proto's ConnectionEventKind, without its prefix)."""

    CONNECTED = "connected"
    REFRESHED = "refreshed"
    REFRESH_FAILED = "refresh_failed"
    NEEDS_REAUTH = "needs_reauth"
    RECOVERED = "recovered"
    DISCONNECTED = "disconnected"
    SCOPES_CHANGED = "scopes_changed"


# -- building events (called by the use cases, written by the store) ---------------------


def connected(user_id: str, upstream_key: str, now: float) -> ConnectionEventRow:
    """A connect flow completed (a first connection or a reconnection)."""
    return ConnectionEventRow(user_id, upstream_key, EventKind.CONNECTED.value, "connected", None, now)


def refreshed(previous: Credential, now: float) -> ConnectionEventRow:
    """A refresh succeeded: RECOVERED when the refresh before it had failed, else REFRESHED."""
    kind = EventKind.RECOVERED if previous.failure_count > 0 else EventKind.REFRESHED
    return ConnectionEventRow(previous.user_id, previous.upstream_key, kind.value, "connected", None, now)


def refresh_failed(
    user_id: str, upstream_key: str, status: CredentialStatus, error_class: str, now: float
) -> ConnectionEventRow:
    """A refresh failed: NEEDS_REAUTH when the grant is gone, else REFRESH_FAILED (retried)."""
    kind = EventKind.NEEDS_REAUTH if status is CredentialStatus.NEEDS_REAUTH else EventKind.REFRESH_FAILED
    return ConnectionEventRow(user_id, upstream_key, kind.value, status.value, error_class, now)


def disconnected(user_id: str, upstream_key: str, now: float) -> ConnectionEventRow:
    """The credential was deleted (Disconnect)."""
    return ConnectionEventRow(user_id, upstream_key, EventKind.DISCONNECTED.value, "not_connected", None, now)


def reaped(user_id: str, upstream_key: str, now: float) -> ConnectionEventRow:
    """Retention deleted a credential that had needed reconnecting for too long."""
    return ConnectionEventRow(
        user_id, upstream_key, EventKind.DISCONNECTED.value, "not_connected", "retention", now
    )


# -- delivering events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """An event as a watcher sees it: the upstream by name."""

    sequence: int
    user_id: str
    upstream: str
    kind: EventKind
    status: str
    last_error: str | None
    at: float


class _Watcher:
    __slots__ = ("broken", "overflowed", "queue", "upstream_keys", "user_id")

    def __init__(self, user_id: str | None, upstream_keys: Collection[str]) -> None:
        self.user_id = user_id
        self.upstream_keys = upstream_keys
        # Rows, and None to wake a watcher the hub cut off (``broken``).
        self.queue: asyncio.Queue[ConnectionEventRow | None] = asyncio.Queue(WATCHER_QUEUE)
        self.overflowed = False
        self.broken = False

    def wants(self, row: ConnectionEventRow) -> bool:
        return (
            self.user_id is None or row.user_id == self.user_id
        ) and row.upstream_key in self.upstream_keys


class EventHub:
    """Follows the event table and fans events out to this process's watchers."""

    def __init__(
        self,
        store: CredentialStore,
        names: dict[str, str],
        poll_seconds: float,
        listen: Callable[[Callable[[], None], threading.Event], None] | None = None,
        logger: logging.Logger | None = None,
        read_cache: ReadCache | None = None,
    ) -> None:
        """``names``: upstream key -> name, for the configured upstreams (others are not sent).
        ``listen(wake, stop)``: run in a thread, calls ``wake()`` whenever another process may
        have committed events (PostgreSQL LISTEN), until ``stop`` is set. ``read_cache``: told
        of every event (when it caches at all)."""
        self._store = store
        self._names = names
        self._poll = poll_seconds
        self._read_cache = (
            read_cache if read_cache is not None and read_cache.read_cache_seconds > 0 else None
        )
        self._gap = 0.0
        if self._read_cache is not None:
            # A read at least every half window: the cache may then keep what it read.
            self._gap = min(EVENT_READ_GAP_SECONDS, self._read_cache.read_cache_seconds / 4)
            self._poll = min(poll_seconds, self._read_cache.read_cache_seconds / 4)
        # A wake-up is on its way to the loop (set by the listen thread, cleared by the hub when
        # it reads): notifications in between cost no loop wake-up each.
        self._wake_pending = False
        self._listen = listen
        self._log = logger or get_logger()
        self._watchers: set[_Watcher] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_listening = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: threading.Thread | None = None
        self.position = 0
        # With no watcher, events are not read at all (a change on another process would
        # otherwise cost this one a store read); the first watcher brings ``position`` up to date.
        self._behind = False
        self._catch_up_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self.position = await asyncio.to_thread(self._store.last_event_sequence)
        loop = asyncio.get_running_loop()
        if self._listen is not None:
            listen = self._listen

            def wake() -> None:
                if not self._wake_pending:
                    self._wake_pending = True
                    loop.call_soon_threadsafe(self._wake.set)

            self._stop_listening.clear()
            self._listener = threading.Thread(
                target=listen, args=(wake, self._stop_listening), name="event-listen", daemon=True
            )
            self._listener.start()
        self._stopping.clear()
        self._task = loop.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._stop_listening.set()
        if task is None:
            return
        self._stopping.set()
        self._wake.set()
        await task
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 5.0)
            self._listener = None

    def wake(self) -> None:
        """Look for new events now (this process just wrote one)."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)
            self._wake_pending = False
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                await self._follow()
            except BrokerError as exc:
                self._log.warning("reading connection events failed", extra=fields(error=exc.code))
                self._cut_off_watchers()
            except Exception as exc:  # a bug must not end the hub for the life of the process
                self._log.error("reading connection events failed", extra=fields(error=type(exc).__name__))
                self._cut_off_watchers()
            if self._gap and not self._watchers:
                await asyncio.sleep(self._gap)

    async def _follow(self) -> None:
        cache = self._read_cache
        if not self._watchers and cache is None:
            self._behind = True  # nobody to hand events to: none is read
            return
        await self._catch_up()
        started = time.monotonic()
        while True:
            rows = await asyncio.to_thread(self._store.events_after, self.position, PAGE)
            for row in rows:
                self.position = row.sequence
                if cache is not None:
                    cache.changed(row.user_id, row.upstream_key)
                for watcher in list(self._watchers):
                    if watcher.overflowed or not watcher.wants(row):
                        continue
                    try:
                        watcher.queue.put_nowait(row)
                    except asyncio.QueueFull:
                        # Cut off: it raises once it reaches its (full) queue's end; it is never
                        # blocked waiting meanwhile, since its queue is not empty.
                        watcher.overflowed = True
                        self._watchers.discard(watcher)
            if len(rows) < PAGE:
                if cache is not None:
                    cache.followed_through(started)
                return

    def _cut_off_watchers(self) -> None:
        """The events could not be read: every watcher's stream ends (StoreError) rather than
        look healthy while changes go unseen (a client cache would keep serving them). It may
        resume with after_sequence; nothing is lost, since ``position`` did not move past what
        was handed out."""
        for watcher in self._watchers:
            watcher.broken = True
            with contextlib.suppress(asyncio.QueueFull):  # a full queue ends at its end anyway
                watcher.queue.put_nowait(None)
        self._watchers.clear()

    # -- watching ------------------------------------------------------------------------

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    async def watch(
        self,
        user_id: str | None,
        upstream_keys: Collection[str],
        after_sequence: int | None,
        live: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[ConnectionEvent]:
        """Events for ``user_id`` (every user when None) on ``upstream_keys``, in sequence
        order, each once: those after ``after_sequence`` first (from the store), then live ones.
        Without ``after_sequence``, only events committed from now on. ``live`` is awaited once
        the watcher is subscribed: every event committed after it returns is delivered (the
        servicer sends the response headers then). Raises WatcherTooSlow when the watcher fell
        ``WATCHER_QUEUE`` events behind, StoreError when the hub could not read the events."""
        watcher = _Watcher(user_id, frozenset(upstream_keys))
        self._watchers.add(watcher)  # before reading the backlog: nothing falls between the two
        try:
            await self._catch_up()
            last = self.position if after_sequence is None else after_sequence
            if live is not None:
                await live()
            if after_sequence is not None:
                while True:
                    rows = await asyncio.to_thread(self._store.events_after, last, PAGE, user_id)
                    # Read after the page: retention that deleted any event above ``last``
                    # (before or during this read) has raised the mark past it by then.
                    await self._check_retained(last)
                    for row in rows:
                        last = row.sequence
                        if watcher.wants(row):
                            yield self._event(row)
                    if len(rows) < PAGE:
                        break
            while True:
                if watcher.queue.empty():
                    if watcher.overflowed:
                        raise WatcherTooSlow(
                            "this watcher fell too far behind and was cut off; reconnect with "
                            "after_sequence set to the last sequence it received"
                        )
                    if watcher.broken:
                        raise StoreError(
                            "the connection events cannot be read from the store right now; "
                            "watch again with after_sequence set to the last sequence received"
                        )
                live_row = await watcher.queue.get()
                if live_row is None or live_row.sequence <= last:
                    continue  # a wake-up, or already delivered from the backlog
                last = live_row.sequence
                yield self._event(live_row)
        finally:
            self._watchers.discard(watcher)

    async def _catch_up(self) -> None:
        """After a time without watchers: skip the events committed meanwhile (nobody watched
        them) by moving ``position`` to the newest one."""
        if not self._behind:
            return
        async with self._catch_up_lock:
            if self._behind:
                newest = await asyncio.to_thread(self._store.last_event_sequence)
                self.position = max(self.position, newest)
                self._behind = False

    async def _check_retained(self, last: int) -> None:
        """Raise WatchResyncRequired when retention deleted events after ``last``."""
        trimmed = await asyncio.to_thread(self._store.events_trimmed_through)
        if last < trimmed:
            raise WatchResyncRequired(
                f"after_sequence {last} is older than the retained connection events (kept from "
                f"sequence {trimmed + 1}); read the current state with ListConnections, then "
                "watch again without after_sequence"
            )

    def watch_connections(
        self,
        user_id: str | None,
        upstreams: Collection[str],
        after_sequence: int | None,
        may_use: Callable[[str], bool],
        live: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[ConnectionEvent]:
        """The WatchConnections use case: check the request, then :meth:`watch`. ``upstreams``
        by name (each must be configured and usable by the caller); none: every upstream the
        caller may use (``may_use``). Raises InvalidArgument, UnknownUpstream or
        CallerNotPermitted before anything is streamed."""
        user = None if user_id is None else validation.user_id(user_id)
        if len(upstreams) > len(self._names) + 16:
            raise InvalidArgument("upstreams: more names than there are upstreams")
        by_name = {name: key for key, name in self._names.items()}
        keys: set[str] = set()
        for name in upstreams:
            key = by_name.get(name)
            if key is None:
                validation.upstream(name)
                raise UnknownUpstream(f"upstream {name!r} is not configured")
            if not may_use(name):
                raise CallerNotPermitted(f"this caller may not use upstream {name!r}")
            keys.add(key)
        if not upstreams:
            keys = {key for key, name in self._names.items() if may_use(name)}
        return self.watch(user, keys, after_sequence, live)

    def _event(self, row: ConnectionEventRow) -> ConnectionEvent:
        return ConnectionEvent(
            row.sequence,
            row.user_id,
            self._names.get(row.upstream_key, ""),
            EventKind(row.kind),
            row.status,
            row.last_error,
            row.at,
        )
