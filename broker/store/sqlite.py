"""SQLite backend: one file, WAL mode, mode 0600, schema versioned by ``PRAGMA user_version``.

Each thread gets its own connection (the event loop reads on its thread; writes run in worker
threads). Writes use ``BEGIN IMMEDIATE`` so a compare-and-swap on a credential's generation is
atomic across threads and across processes sharing the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from broker.errors import StoreError
from broker.store.base import (
    CRED_COLUMNS,
    CRED_SELECT,
    FLOW_COLUMNS,
    ConnectionEventRow,
    CredentialRow,
    PendingFlowRow,
    flow_from_row,
)
from broker.store.sql import (
    EVENT_COLUMNS,
    EVENT_USER_INDEX,
    HOSTED_CONNECT_MIGRATION,
    REFRESH_SCHEDULE_INDEXES,
)
from broker.store.upkeep import SQLITE_MIGRATION, UpkeepQueries

SCHEMA_VERSION = 7
_BUSY_TIMEOUT_MS = 5000
#: How long ``reclaim_space`` keeps trying to copy the whole WAL back (see there).
RECLAIM_CHECKPOINT_SECONDS = 2.0


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (once per file; a no-op after that). Switching a new file while
    another process opens it answers "database is locked" without waiting for the busy
    timeout, so it is retried here for as long as that timeout."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _migrate_1(db: sqlite_utils.Database) -> None:
    db["credentials"].create(
        {
            "user_id": str,
            "upstream_key": str,
            "token_type": str,
            "scopes": str,
            "expires_at": float,
            "obtained_via": str,
            "status": str,
            "generation": int,
            "kek_id": str,
            "sealed": bytes,
            "created_at": float,
            "updated_at": float,
            "last_refresh_at": float,
            "last_error": str,
            "failure_count": int,
        },
        pk=("user_id", "upstream_key"),
        not_null={"user_id", "upstream_key", "status", "generation", "kek_id", "sealed"},
    )
    db["credentials"].create_index(["kek_id"])
    db["pending_flows"].create(
        {
            "state_hash": str,
            "user_id": str,
            "upstream_key": str,
            "created_at": float,
            "expires_at": float,
            "kek_id": str,
            "sealed": bytes,
        },
        pk="state_hash",
        not_null={"user_id", "upstream_key", "created_at", "expires_at", "kek_id", "sealed"},
    )
    db["pending_flows"].create_index(["user_id", "upstream_key", "created_at"])
    db["pending_flows"].create_index(["expires_at"])


def _migrate_2(db: sqlite_utils.Database) -> None:
    """Credential lifecycle: when to retry after a transient failure, and the refresh lease that
    keeps two processes from presenting the same refresh token."""
    table = db["credentials"]
    table.add_column("next_attempt_at", float)
    table.add_column("lease_owner", str)
    table.add_column("lease_until", float)


def _migrate_key_checks(db: sqlite_utils.Database) -> None:
    """Per-key check values (broker/crypto/keycheck.py): one authenticated record per key id
    that proves a keyring's key is the store's, so damaged records are never taken for a wrong
    keyring."""
    db["key_checks"].create(
        {"kek_id": str, "check_value": bytes, "created_at": float},
        pk="kek_id",
        not_null={"kek_id", "check_value"},
    )


def _migrate_refresh_schedule(db: sqlite_utils.Database) -> None:
    """Indexes the background refresher's scans use (broker/refresher.py): by refresh due time
    (expiry, or a later retry after a failure), and by last refresh per upstream (keep-alive).
    Partial: credentials that need reconnecting are never scanned again."""
    for statement in REFRESH_SCHEDULE_INDEXES:
        db.execute(statement)


def _migrate_events(db: sqlite_utils.Database) -> None:
    """Connection events (broker/events.py): one row per change, written with the change; the
    sequence is the row id (AUTOINCREMENT: never reused, so a watcher's position stays valid)."""
    db.execute(f"CREATE TABLE connection_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, {EVENT_COLUMNS})")
    db.execute(EVENT_USER_INDEX)


def _migrate_health_retention(db: sqlite_utils.Database) -> None:
    """Connection health columns and retention (broker/store/upkeep.py)."""
    for statement in SQLITE_MIGRATION:
        db.execute(statement)


def _migrate_hosted_connect(db: sqlite_utils.Database) -> None:
    """Hosted connect (broker/connect/): the hashes of a flow's /start reference and of the
    cookie secret of the browser that opened it."""
    for statement in HOSTED_CONNECT_MIGRATION:
        db.execute(statement)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migrate_1,
    _migrate_2,
    _migrate_key_checks,
    _migrate_refresh_schedule,
    _migrate_events,
    _migrate_health_retention,
    _migrate_hosted_connect,
]


class SqliteStore(UpkeepQueries):
    """The default store: a local SQLite file."""

    schema_version = SCHEMA_VERSION
    INSERT_ORDER = "rowid"
    SEALED_AS_BYTES = "CAST(sealed AS BLOB)"
    # A damaged row holding text (invalid UTF-8) in the sealed column then fails closed as a
    # record that does not open, instead of raising sqlite3's decode error, which quotes it.
    CRED_READ = CRED_SELECT.replace("sealed", SEALED_AS_BYTES)
    FLOW_READ = FLOW_COLUMNS.replace("sealed", SEALED_AS_BYTES)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Create the file 0600 before SQLite opens it; the -wal and -shm files inherit it.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store at {path}: {_describe(exc)}") from exc

    # -- connections ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreError("the store is closed")
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                _use_wal(conn)
                conn.execute("PRAGMA synchronous = NORMAL")
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._conn()  # a thread's first write opens its connection: that may fail too
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {_describe(exc)}") from exc

    def _read(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {_describe(exc)}") from exc

    def _migrate(self) -> None:
        conn = self._conn()
        db = sqlite_utils.Database(conn)
        # A new file (no tables yet) takes the vacuum mode at once; see _use_incremental_vacuum.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the store at {self.path} has schema version {version}, newer than this "
                    f"broker's {SCHEMA_VERSION}; upgrade the broker"
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[number - 1](db)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._use_incremental_vacuum(conn)

    @staticmethod
    def _use_incremental_vacuum(conn: sqlite3.Connection) -> None:
        """Put the file in incremental auto-vacuum mode, so pages freed by purging expired flows
        can be given back (``reclaim_space``). A migration of the file, not of the schema: a
        store created before this existed is converted once, by one VACUUM (which rewrites the
        file and cannot run inside a transaction); later opens find the mode set and do nothing."""
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # 2: incremental
            return
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")

    # -- credentials ---------------------------------------------------------------------

    def save_credential(
        self, row: CredentialRow, expected_generation: int | None, event: ConnectionEventRow | None = None
    ) -> int | None:
        with self._write() as conn:
            current = conn.execute(
                "SELECT generation, created_at, last_used_at FROM credentials WHERE user_id = ? AND upstream_key = ?",
                (row.user_id, row.upstream_key),
            ).fetchone()
            if expected_generation is not None and (current is None or current[0] != expected_generation):
                return None
            generation = (current[0] if current else 0) + 1
            created = current[1] if current else row.created_at
            conn.execute(
                f"INSERT OR REPLACE INTO credentials ({CRED_COLUMNS}, refresh_token_expires_at, last_used_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.user_id,
                    row.upstream_key,
                    row.token_type,
                    json.dumps(list(row.scopes)),
                    row.expires_at,
                    row.obtained_via,
                    row.status,
                    generation,
                    row.kek_id,
                    row.sealed,
                    created,
                    row.updated_at,
                    row.last_refresh_at,
                    row.last_error,
                    row.failure_count,
                    row.refresh_token_expires_at,
                    current[2] if current else None,  # the last Resolve outlives a refresh
                ),
            )
            if event is not None:
                self._add_event(conn, event)
            return int(generation)

    # -- pending flows -------------------------------------------------------------------

    def take_pending_flow(self, state_hash: str) -> PendingFlowRow | None:
        with self._write() as conn:
            found = conn.execute(
                f"SELECT {self.FLOW_READ} FROM pending_flows WHERE state_hash = ?", (state_hash,)
            ).fetchone()
            if found is None:
                return None
            conn.execute("DELETE FROM pending_flows WHERE state_hash = ?", (state_hash,))
            return flow_from_row(found)

    def reclaim_space(self) -> None:
        """Hand the file's free pages back (incremental vacuum), then checkpoint the WAL so the
        database file itself is truncated now rather than at the next automatic checkpoint.

        The file shrinks only when a checkpoint copies the whole WAL. A PASSIVE checkpoint is cut
        short by another checkpoint in progress (another connection's or process's) or by a
        reader still on a snapshot from before the vacuum; both last milliseconds, so the
        checkpoint is tried again for up to ``RECLAIM_CHECKPOINT_SECONDS`` (this runs in a worker
        thread). If the WAL is still not copied then, the next checkpoint finishes the job."""
        try:
            conn = self._conn()
            # The pragma frees one page per step and its rows have no columns, which Python's
            # execute() stops at after one step; executescript() runs it to the end.
            conn.executescript("PRAGMA incremental_vacuum;")
            deadline = time.monotonic() + RECLAIM_CHECKPOINT_SECONDS
            while True:
                busy, log, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if (not busy and log == copied) or time.monotonic() >= deadline:
                    return
                time.sleep(0.02)
        except sqlite3.Error as exc:
            raise StoreError(f"store vacuum failed: {_describe(exc)}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


def _describe(exc: BaseException) -> str:
    # sqlite3 messages carry SQL or file paths, not bound values (we always bind parameters);
    # the one exception, the text decode error, quotes a column's contents, so it is replaced.
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    if text.startswith("Could not decode to UTF-8"):
        return "a text column holds bytes that are not UTF-8 (a damaged row)"
    return text
