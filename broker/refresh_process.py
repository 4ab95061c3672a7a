"""The background refresher in a child process of its own (``background_refresh.separate_process``).

A refresh is CPU work in Python: an HTTP exchange, JSON, sealing, store writes, an event and an
audit record. Run as a task of the serving process it shares the event loop and the interpreter
lock with Resolve, and a herd of due credentials then delays every Resolve behind it (measured
in benchmarks/background_refresh.py). In a child process it has its own interpreter, at a lower
CPU priority (``process_scheduling``: the idle scheduling class by default), so the kernel
serves Resolve first when cores are busy.

The child (``python -m broker.refresh_worker``) gets the parent's config (after discovery)
pickled on its stdin and keeps stdin open: when the parent closes it, or dies, the child
finishes the refreshes in flight and exits. It reports its counts on a pipe of its own twice a
second; :attr:`RefresherProcess.stats` mirrors them for the metrics endpoint. The child shares
nothing else with the parent but the store: the refresh lease and the single writer of each
credential work across processes exactly as across replicas, its events reach watchers through
the store, and the parent's read cache (``read_cache_seconds``) sees a refreshed credential as a
replica's would.

If the child exits on its own (a crash, the KMS unreachable at its start) it is started again
after a backoff (1 s doubling to 60 s), with an error logged each time; a child that lived longer
than 60 s before it died is started again after 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import sys
import time
from collections import Counter
from collections.abc import Callable

from broker.audit import AuditEvent
from broker.config import BrokerConfig
from broker.logs import fields, get_logger
from broker.refresher import RefreshStats

# The child has this long to finish the refreshes in flight once asked to stop (their HTTP
# requests have deadlines of their own); then it is killed.
STOP_GRACE_SECONDS = 30.0
RESTART_BACKOFF_SECONDS = (1.0, 60.0)


class RefresherProcess:
    """Starts, watches and stops the refresher's child process; same surface as the in-process
    BackgroundRefresher for the app (start, stop, stats)."""

    def __init__(
        self,
        config: BrokerConfig,
        logger: logging.Logger | None = None,
        on_failures: Callable[[str, str, int], None] | None = None,
    ) -> None:
        """``on_failures(upstream, reason, count)`` is told of the child's failed refreshes as
        they are reported (the metrics' refresh failures by reason)."""
        self._config = config
        self._log = logger or get_logger()
        self._on_failures = on_failures
        self.stats = RefreshStats()
        #: Times the child was started (1 after a normal start; more after restarts).
        self.starts = 0
        self.pid: int | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Counts of children that exited: a restarted child counts from zero, the metrics never go back.
        self._base: Counter[tuple[str, str]] = Counter()

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name="refresh-process")

    async def stop(self) -> None:
        """Ask the child to stop (stdin closed), wait for it, kill it after the grace period."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await task

    async def _supervise(self) -> None:
        first, longest = RESTART_BACKOFF_SECONDS
        backoff = first
        while not self._stopping.is_set():
            started = time.monotonic()
            code = await self._run_once()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= longest:
                # It lived longer than the longest backoff: a new failure, not the same crash loop.
                backoff = first
            self._log.error(
                "background refresh process exited; starting it again",
                extra=fields(exit_code=code, retry_in_seconds=backoff),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, longest)

    async def _run_once(self) -> int | None:
        """Run one child until it exits or we are stopping; its exit code."""
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "broker.refresh_worker",
                "--stats-fd",
                str(write_fd),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
            )
        except OSError as exc:
            os.close(read_fd)
            self._log.error("background refresh process did not start", extra=fields(error=str(exc)))
            return None
        finally:
            os.close(write_fd)
        self.pid = proc.pid
        self.starts += 1
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self._config))
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        reader = asyncio.create_task(self._read_stats(read_fd))
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait((exited, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                proc.stdin.close()  # the child's cue to finish and exit
                try:
                    await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE_SECONDS)
                except TimeoutError:
                    self._log.warning("background refresh process did not stop in time; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            return await exited
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(reader, 1.0)
            self._base = Counter(self.stats.outcomes)

    async def _read_stats(self, fd: int) -> None:
        """Mirror the child's stats lines until it closes the pipe."""
        loop = asyncio.get_running_loop()
        reported: Counter[tuple[str, str]] = Counter()  # this child's failures told so far
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while line := await reader.readline():
                try:
                    snapshot = json.loads(line)
                    self.stats.outcomes = self._base + Counter(
                        {(upstream, outcome): int(n) for upstream, outcome, n in snapshot["outcomes"]}
                    )
                    self.stats.lag_seconds = float(snapshot["lag_seconds"])
                    self.stats.ticks = int(snapshot["ticks"])
                    failures = Counter(
                        {(upstream, reason): int(n) for upstream, reason, n in snapshot["failures"]}
                    )
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line at a crash: the next one replaces it
                for key, count in (failures - reported).items():
                    if self._on_failures is not None:
                        self._on_failures(*key, count)
                reported |= failures
        finally:
            transport.close()


class FailureCounter:
    """An audit sink (in the child) counting failed refreshes by upstream and reason."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def emit(self, event: AuditEvent) -> None:
        if event.action == "refresh" and event.outcome == "failure":
            self.counts[(event.upstream, event.reason or "unknown")] += 1


def stats_line(stats: RefreshStats, failures: FailureCounter) -> bytes:
    """One stats snapshot as the child sends it (counts, never a user or a token)."""
    snapshot = {
        "outcomes": [[upstream, outcome, n] for (upstream, outcome), n in stats.outcomes.items()],
        "failures": [[upstream, reason, n] for (upstream, reason), n in failures.counts.items()],
        "lag_seconds": stats.lag_seconds,
        "ticks": stats.ticks,
    }
    return (json.dumps(snapshot) + "\n").encode()
