"""Background refresh: credentials are refreshed ahead of expiry without waiting for a Resolve.

Every ``background_refresh.interval_seconds`` (with jitter) each process asks the store for a
bounded batch of credentials that are due, using two indexed range scans (no full scan, whatever
the number of credentials stored; see ``due_for_refresh`` and ``idle_for_refresh`` in
broker/store/sql.py):

- **ahead of expiry**: the access token has less than the lead left. The lead is
  ``ahead_seconds``, at most half the token's lifetime (a short-lived token is not refreshed
  right after each refresh), shortened by up to 20% per credential (a stable hash of the user,
  upstream and last refresh), so credentials connected together spread out;
- **keep-alive**: an upstream with ``refresh_token_idle_seconds`` has its credentials refreshed
  before that idle limit (with the same lead and jitter), even if nobody calls Resolve.

Only ``oauth_connect`` upstreams, and exchange upstreams with ``store_refresh_token``
(long-running on-behalf-of), are scanned, one by one (other exchanged credentials, and those of
upstreams no longer configured, are never read). A credential found without a refresh token is
left out of later scans (``defer_refresh``) until it is written again.

Each refresh goes through :meth:`BrokerService.refresh_if_due`: the same single flight as
Resolve in this process, and the same refresh lease across processes and replicas. The row is
re-read there, and ``due`` asked again, after any other process's refresh: so one credential is
refreshed by exactly one process, once. Credentials that need reconnecting are never scanned; a
failed refresh sets the backoff (``next_attempt_at``) exactly as Resolve's does, and the scan
skips the credential until then.

Concurrency: at most ``max_concurrent`` background refreshes per upstream per process, and never
more than half of that upstream's ``http.max_concurrent_requests`` (the bulkhead), so Resolve
always has request slots left. Each upstream has a timer of its own: a token endpoint that hangs
until every request's deadline holds back only its own upstream's next scan, never another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

from broker.clock import Clock
from broker.config import BrokerConfig, UpstreamConfig
from broker.errors import BrokerError
from broker.logs import fields, get_logger
from broker.models import Credential, CredentialStatus
from broker.service import BrokerService
from broker.store.base import CredentialStore, DueCredential

# Credentials fetched per scan per tick (each scan; the keep-alive scan is per upstream).
BATCH_SIZE = 500
# Each credential's lead is shortened by up to this fraction (spreads a herd).
JITTER_FRACTION = 0.2
# A credential without a refresh token is left out of the scans this long (a reconnect, which
# writes the row again, brings it back at once).
DEFER_UNREFRESHABLE_SECONDS = 365 * 86400.0
# Never schedule a refresh sooner than this after the previous one (degenerate token lifetimes).
MIN_GAP_SECONDS = 1.0
# Failed scans (the store unavailable) are logged at most once in this many seconds.
SCAN_WARNING_SECONDS = 60.0


@dataclass
class RefreshStats:
    """Counts since start, by (upstream name, outcome); the latest tick's lag behind schedule."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Seconds the most overdue credential refreshed in the latest tick was behind its schedule.
    lag_seconds: float = 0.0
    ticks: int = 0

    def count(self, outcome: str) -> int:
        """All upstreams' total for ``outcome`` ("done", "failed" or "skipped")."""
        return sum(n for (_, kind), n in self.outcomes.items() if kind == outcome)


class BackgroundRefresher:
    """A background task started and stopped with the server (see broker/app.py)."""

    def __init__(
        self,
        config: BrokerConfig,
        store: CredentialStore,
        service: BrokerService,
        clock: Clock,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        settings = config.background_refresh
        self._ahead = float(settings.ahead_seconds)
        self._interval = settings.interval_seconds
        self._min_interval = float(config.min_refresh_interval_seconds)
        self._store = store
        self._service = service
        self._clock = clock
        self._log = logger or get_logger()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._by_key = {u.key: u for u in config.upstreams if u.auth_broker.refreshable}
        per_upstream = min(settings.max_concurrent, max(1, config.http.max_concurrent_requests // 2))
        self._slots = {key: asyncio.Semaphore(per_upstream) for key in self._by_key}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = RefreshStats()
        # The latest scan's lag behind schedule, by upstream key (stats.lag_seconds is the largest).
        self._lags: dict[str, float] = {}
        # When a failed scan was last logged (time.monotonic()); None once a scan succeeds.
        self._scan_warned_at: float | None = None
        # Credentials without a refresh token met by ``due``, by (user, upstream key): generation.
        self._unrefreshable: dict[tuple[str, str], int] = {}

    # -- schedule ------------------------------------------------------------------------

    def _lead(self, lifetime: float | None, jitter: float) -> float:
        lead = self._ahead if lifetime is None else min(self._ahead, max(0.0, lifetime) / 2)
        return lead * (1.0 - JITTER_FRACTION * jitter)

    def scheduled_at(
        self, upstream: UpstreamConfig, user_id: str, expires_at: float | None, last_refresh_at: float | None
    ) -> float | None:
        """When a credential with these fields should be refreshed in the background, or None
        (a token without expiry on an upstream without keep-alive)."""
        basis = f"{user_id}\x00{upstream.key}\x00{last_refresh_at!r}".encode()
        jitter = zlib.crc32(basis) / 0xFFFFFFFF
        times: list[float] = []
        lifetime = None
        if expires_at is not None and last_refresh_at is not None:
            lifetime = expires_at - last_refresh_at
        if expires_at is not None:
            times.append(expires_at - self._lead(lifetime, jitter))
        idle = upstream.refresh_token_idle_seconds
        if idle is not None and last_refresh_at is not None:
            times.append(last_refresh_at + idle - self._lead(float(idle), jitter))
        if not times:
            return None
        at = min(times)
        if last_refresh_at is not None:
            gap = MIN_GAP_SECONDS if lifetime is None else max(MIN_GAP_SECONDS, lifetime / 2)
            at = max(at, last_refresh_at + min(self._min_interval, gap))
        return at

    def due(self, credential: Credential, now: float) -> bool:
        """Whether ``credential`` (as just read from the store) should be refreshed now."""
        upstream = self._by_key.get(credential.upstream_key)
        if (
            upstream is None
            or credential.status is CredentialStatus.NEEDS_REAUTH
            or (credential.next_attempt_at is not None and now < credential.next_attempt_at)
        ):
            return False
        if not credential.secrets.refresh_token:
            # Never refreshable until the user connects again: keep it out of later scans.
            self._unrefreshable[(credential.user_id, credential.upstream_key)] = credential.generation
            return False
        at = self.scheduled_at(
            upstream, credential.user_id, credential.expires_at, credential.last_refresh_at
        )
        return at is not None and at <= now

    # -- timer ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="background-refresh")

    async def stop(self) -> None:
        """Stop the timer; a tick in progress finishes first (its requests have deadlines)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await task

    async def _run(self) -> None:
        # One timer per upstream: a token endpoint that hangs holds back only its own upstream's
        # scans (its batch drains at its own concurrency), never another upstream's.
        await asyncio.gather(*(self._run_upstream(upstream) for upstream in self._by_key.values()))

    async def _run_upstream(self, upstream: UpstreamConfig) -> None:
        backlog = False
        while not self._stopping.is_set():
            if not backlog:
                wait = self._interval * self._rng.uniform(0.8, 1.2)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
            if self._stopping.is_set():
                return
            try:
                _, backlog = await self._tick_upstream(upstream, self._clock.now())
            except Exception as exc:  # a bug must not end the timer for the life of the process
                backlog = False
                self._log.error("background refresh tick failed", extra=fields(error=type(exc).__name__))

    # -- one tick ------------------------------------------------------------------------

    async def scan(
        self, now: float, upstreams: list[UpstreamConfig] | None = None
    ) -> list[tuple[DueCredential, UpstreamConfig, float]]:
        """The due credentials of this tick (of ``upstreams``, default every one) with their
        upstream and scheduled time."""
        found: list[DueCredential] = []
        for upstream in self._by_key.values() if upstreams is None else upstreams:
            found += await asyncio.to_thread(
                self._store.due_for_refresh, upstream.key, now + self._ahead, now, BATCH_SIZE
            )
            idle = upstream.refresh_token_idle_seconds
            if idle is not None:
                before = now - idle + min(self._ahead, idle / 2)
                found += await asyncio.to_thread(
                    self._store.idle_for_refresh, upstream.key, before, now, BATCH_SIZE
                )
        due: dict[tuple[str, str], tuple[DueCredential, UpstreamConfig, float]] = {}
        for row in found:
            owner = self._by_key.get(row.upstream_key)
            if owner is None:
                continue  # an upstream no longer configured (or not oauth_connect)
            at = self.scheduled_at(owner, row.user_id, row.expires_at, row.last_refresh_at)
            if at is not None and at <= now:
                due[(row.user_id, row.upstream_key)] = (row, owner, at)
        return list(due.values())

    async def tick(self) -> int:
        """Scan every upstream once and refresh what is due; how many this process refreshed. A
        store failure is logged, never raised: the next tick tries again."""
        now = self._clock.now()
        results = await asyncio.gather(
            *(self._tick_upstream(upstream, now) for upstream in self._by_key.values())
        )
        return sum(done for done, _ in results)

    async def _tick_upstream(self, upstream: UpstreamConfig, now: float) -> tuple[int, bool]:
        """One upstream's scan and refreshes: how many this process refreshed, and whether a
        backlog may be waiting (the next scan of this upstream should start at once)."""
        try:
            due = await self.scan(now, [upstream])
        except BrokerError as exc:
            # Every upstream's scan meets a store outage: one warning a minute, not one per scan.
            at = time.monotonic()
            if self._scan_warned_at is None or at - self._scan_warned_at >= SCAN_WARNING_SECONDS:
                self._scan_warned_at = at
                self._log.warning("background refresh scan failed", extra=fields(error=exc.code))
            return 0, False
        self._scan_warned_at = None
        self.stats.ticks += 1
        self._lags[upstream.key] = max(0.0, max((now - at for _, _, at in due), default=0.0))
        self.stats.lag_seconds = max(self._lags.values())
        if not due:
            return 0, False
        done = sum(await asyncio.gather(*(self.refresh_one(row, owner) for row, owner, _ in due)))
        # A full batch was due and this process did a good share of it: more may be waiting
        # behind it, so the next scan starts at once instead of after the interval (a herd drains
        # at the refresh rate). Not when other replicas did most of it (their leases): no spin.
        return done, len(due) >= BATCH_SIZE and done >= BATCH_SIZE // 4

    async def refresh_one(self, row: DueCredential, upstream: UpstreamConfig) -> int:
        async with self._slots[upstream.key]:
            if self._stopping.is_set():
                return 0
            try:
                refreshed = await self._service.refresh_if_due(row.user_id, upstream.key, self.due)
            except BrokerError as exc:
                self.stats.outcomes[(upstream.name, "failed")] += 1
                self._log.info(
                    "background refresh failed",
                    extra=fields(user_id=row.user_id, upstream=upstream.name, error=exc.code),
                )
                return 0
            generation = self._unrefreshable.pop((row.user_id, upstream.key), None)
            if generation is not None:
                until = self._clock.now() + DEFER_UNREFRESHABLE_SECONDS
                try:
                    await asyncio.to_thread(
                        self._store.defer_refresh, row.user_id, upstream.key, generation, until
                    )
                except BrokerError as exc:
                    self._log.warning("background refresh defer failed", extra=fields(error=exc.code))
        self.stats.outcomes[(upstream.name, "done" if refreshed else "skipped")] += 1
        return 1 if refreshed else 0
