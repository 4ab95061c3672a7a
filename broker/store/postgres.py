"""PostgreSQL backend: the same rows and sealed records as SQLite, shared by every replica.

psycopg 3 with its (synchronous) connection pool; connections run in autocommit mode so a read
is one round trip, and writes open an explicit transaction. The schema is versioned by the
one-row table ``credential_broker_schema``; migrations run under a transaction-scoped advisory
lock so two replicas starting together do not race.

Atomicity across replicas:
- ``save_credential`` with an expected generation is one ``UPDATE ... WHERE generation = %s``:
  under READ COMMITTED a concurrent writer waits for the row lock, then re-checks the WHERE on
  the committed row and matches nothing, so exactly one compare-and-swap wins.
- ``lock_refresh`` takes a session advisory lock keyed by a hash of (user, upstream) on a
  dedicated pooled connection, waiting at most ``lock_timeout``; the lock is held while the
  token request runs and dies with the session if the process does.

Errors: every psycopg/pool error becomes a StoreError (UNAVAILABLE) here, once. Messages carry
the error class and SQLSTATE, never the DSN or its password. After a connection failure, reads
stop waiting for the pool for a short while (they run on the event loop) and fail fast until a
connection comes back; the pool reconnects in the background by itself.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql

from broker.errors import StoreError
from broker.store.base import CredentialRow, PendingFlowRow, RefreshLock

SCHEMA_VERSION = 1
_MIGRATION_LOCK = 0x63625F6D6967  # advisory lock id for migrations ("cb_mig")
_READ_WAIT_SECONDS = 1.0  # pool wait for a read on the event loop when the database is healthy
_SUSPECT_SECONDS = 2.0  # after a connection failure, reads fail fast for this long
_SUSPECT_READ_WAIT_SECONDS = 0.02
_WRITE_WAIT_SECONDS = 5.0
_RECONNECT_TIMEOUT_SECONDS = 2.0  # a pool slot gives up and is re-grown on demand after this

_CRED_COLUMNS = (
    "user_id, upstream_key, token_type, scopes, expires_at, obtained_via, status, generation, "
    "kek_id, sealed, created_at, updated_at, last_refresh_at, last_error, failure_count"
)
_FLOW_COLUMNS = "state_hash, user_id, upstream_key, created_at, expires_at, kek_id, sealed"

_MIGRATION_1 = (
    """CREATE TABLE credentials (
        user_id text NOT NULL,
        upstream_key text NOT NULL,
        token_type text,
        scopes text,
        expires_at double precision,
        obtained_via text,
        status text NOT NULL,
        generation bigint NOT NULL,
        kek_id text NOT NULL,
        sealed bytea NOT NULL,
        created_at double precision,
        updated_at double precision,
        last_refresh_at double precision,
        last_error text,
        failure_count integer,
        PRIMARY KEY (user_id, upstream_key)
    )""",
    "CREATE INDEX credentials_kek_id ON credentials (kek_id)",
    """CREATE TABLE pending_flows (
        state_hash text PRIMARY KEY,
        user_id text NOT NULL,
        upstream_key text NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision NOT NULL,
        kek_id text NOT NULL,
        sealed bytea NOT NULL,
        seq bigint GENERATED ALWAYS AS IDENTITY
    )""",
    "CREATE INDEX pending_flows_user ON pending_flows (user_id, upstream_key, created_at)",
    "CREATE INDEX pending_flows_expires ON pending_flows (expires_at)",
)

# Each migration is a list of statements run in one transaction; index i is version i + 1.
MIGRATIONS: list[Sequence[str]] = [_MIGRATION_1]


def _cred(row: Sequence[Any]) -> CredentialRow:
    (
        user,
        key,
        token_type,
        scopes,
        expires,
        via,
        status,
        gen,
        kid,
        sealed,
        created,
        updated,
        last_refresh,
        last_error,
        failures,
    ) = row
    return CredentialRow(
        user_id=str(user),
        upstream_key=str(key),
        token_type=str(token_type),
        scopes=tuple(json.loads(str(scopes))),
        expires_at=None if expires is None else float(expires),
        obtained_via=str(via),
        status=str(status),
        generation=int(gen),
        kek_id=str(kid),
        sealed=bytes(sealed),
        created_at=float(created),
        updated_at=float(updated),
        last_refresh_at=None if last_refresh is None else float(last_refresh),
        last_error=None if last_error is None else str(last_error),
        failure_count=int(failures or 0),
    )


def _flow(row: Sequence[Any]) -> PendingFlowRow:
    state_hash, user, key, created, expires, kid, sealed = row
    return PendingFlowRow(
        str(state_hash), str(user), str(key), float(created), float(expires), str(kid), bytes(sealed)
    )


def _lock_key(user_id: str, upstream_key: str) -> int:
    digest = hashlib.sha256(f"refresh\x00{user_id}\x00{upstream_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def describe(exc: BaseException) -> str:
    """A safe description of a database error: its class and SQLSTATE, never the DSN."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return "no database connection available (the database may be unreachable)"
    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        return "the database is unreachable or the connection was lost"
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}" + (f" (SQLSTATE {state})" if state else "")


class _AdvisoryLock:
    """A session advisory lock held on one pooled connection until released."""

    def __init__(self, store: PostgresStore, conn: psycopg.Connection[Any], key: int) -> None:
        self._store = store
        self._conn = conn
        self._key = key
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        except psycopg.Error:
            # A broken session has lost its locks already; make sure this one is not reused.
            self._conn.close()
        finally:
            self._store.pool.putconn(self._conn)


class PostgresStore:
    """Credentials and pending flows in PostgreSQL, shared by every replica."""

    schema_version = SCHEMA_VERSION

    def __init__(self, dsn: str, *, pool_size: int = 10, name: str = "credential-broker") -> None:
        self._dsn = dsn
        self._suspect_until = 0.0
        self._lock = threading.Lock()
        self.pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "application_name": name},
            configure=self._configure,
            reconnect_timeout=_RECONNECT_TIMEOUT_SECONDS,
            name=name,
            open=False,
        )
        try:
            self.pool.open(wait=True, timeout=_WRITE_WAIT_SECONDS)
            self._migrate()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            self.pool.close()
            raise StoreError(f"cannot open the PostgreSQL store: {describe(exc)}") from None
        except BaseException:
            self.pool.close()
            raise

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        # Bound every wait on a row or advisory lock, and every statement.
        conn.execute("SET lock_timeout = '5s'")
        conn.execute("SET statement_timeout = '30s'")

    # -- connections ---------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
            self._suspect_until = time.monotonic() + _SUSPECT_SECONDS

    @contextmanager
    def _connection(self, wait: float) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection(timeout=wait) as conn:
            yield conn

    def _read(self, query: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        """Run a read; a connection that turns out broken (database restarted) is retried once."""
        suspect = time.monotonic() < self._suspect_until
        wait = _SUSPECT_READ_WAIT_SECONDS if suspect else _READ_WAIT_SECONDS
        for attempt in (1, 2):
            try:
                with self._connection(wait) as conn:
                    rows = conn.execute(query, params).fetchall()
                self._suspect_until = 0.0
                return rows
            except psycopg.OperationalError as exc:
                self._failed(exc)
                if attempt == 2 or getattr(exc, "sqlstate", None) is not None:
                    raise StoreError(f"store read failed: {describe(exc)}") from None
                wait = _SUSPECT_READ_WAIT_SECONDS
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                self._failed(exc)
                raise StoreError(f"store read failed: {describe(exc)}") from None
        raise AssertionError("unreachable")

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._connection(_WRITE_WAIT_SECONDS) as conn, conn.transaction():
                yield conn
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            self._failed(exc)
            raise StoreError(f"store write failed: {describe(exc)}") from None

    def _migrate(self) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS credential_broker_schema (version integer NOT NULL)")
            found = conn.execute("SELECT version FROM credential_broker_schema").fetchone()
            version = 0 if found is None else int(found[0])
            if found is None:
                conn.execute("INSERT INTO credential_broker_schema (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the PostgreSQL store has schema version {version}, newer than this broker's "
                    f"{SCHEMA_VERSION}; upgrade the broker"
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number - 1]:
                    conn.execute(sql.SQL(statement))  # constant DDL from MIGRATIONS
                conn.execute("UPDATE credential_broker_schema SET version = %s", (number,))

    # -- credentials ---------------------------------------------------------------------

    def get_credential(self, user_id: str, upstream_key: str) -> CredentialRow | None:
        rows = self._read(
            f"SELECT {_CRED_COLUMNS} FROM credentials WHERE user_id = %s AND upstream_key = %s",
            (user_id, upstream_key),
        )
        return _cred(rows[0]) if rows else None

    def save_credential(self, row: CredentialRow, expected_generation: int | None) -> int | None:
        values = (
            row.token_type,
            json.dumps(list(row.scopes)),
            row.expires_at,
            row.obtained_via,
            row.status,
            row.kek_id,
            row.sealed,
            row.updated_at,
            row.last_refresh_at,
            row.last_error,
            row.failure_count,
        )
        with self._write() as conn:
            if expected_generation is not None:
                found = conn.execute(
                    "UPDATE credentials SET token_type = %s, scopes = %s, expires_at = %s, "
                    "obtained_via = %s, status = %s, kek_id = %s, sealed = %s, updated_at = %s, "
                    "last_refresh_at = %s, last_error = %s, failure_count = %s, "
                    "generation = generation + 1 "
                    "WHERE user_id = %s AND upstream_key = %s AND generation = %s RETURNING generation",
                    (*values, row.user_id, row.upstream_key, expected_generation),
                ).fetchone()
            else:
                found = conn.execute(
                    f"INSERT INTO credentials ({_CRED_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (user_id, upstream_key) DO UPDATE SET "
                    "token_type = EXCLUDED.token_type, scopes = EXCLUDED.scopes, "
                    "expires_at = EXCLUDED.expires_at, obtained_via = EXCLUDED.obtained_via, "
                    "status = EXCLUDED.status, kek_id = EXCLUDED.kek_id, sealed = EXCLUDED.sealed, "
                    "updated_at = EXCLUDED.updated_at, last_refresh_at = EXCLUDED.last_refresh_at, "
                    "last_error = EXCLUDED.last_error, failure_count = EXCLUDED.failure_count, "
                    "generation = credentials.generation + 1 RETURNING generation",
                    (
                        row.user_id,
                        row.upstream_key,
                        row.token_type,
                        json.dumps(list(row.scopes)),
                        row.expires_at,
                        row.obtained_via,
                        row.status,
                        row.kek_id,
                        row.sealed,
                        row.created_at,
                        row.updated_at,
                        row.last_refresh_at,
                        row.last_error,
                        row.failure_count,
                    ),
                ).fetchone()
            return None if found is None else int(found[0])

    def record_failure(
        self, user_id: str, upstream_key: str, status: str, error_class: str, generation: int
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE credentials SET status = %s, last_error = %s, "
                "failure_count = COALESCE(failure_count, 0) + 1 "
                "WHERE user_id = %s AND upstream_key = %s AND generation = %s",
                (status, error_class, user_id, upstream_key, generation),
            )

    def delete_credential(self, user_id: str, upstream_key: str) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM credentials WHERE user_id = %s AND upstream_key = %s", (user_id, upstream_key)
            )
            return cursor.rowcount > 0

    def bulk_insert_credentials(self, rows: Sequence[CredentialRow]) -> None:
        """Load many new rows in one transaction with COPY (benchmarks, imports)."""
        with (
            self._write() as conn,
            conn.cursor().copy(f"COPY credentials ({_CRED_COLUMNS}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(
                    (
                        row.user_id,
                        row.upstream_key,
                        row.token_type,
                        json.dumps(list(row.scopes)),
                        row.expires_at,
                        row.obtained_via,
                        row.status,
                        max(row.generation, 1),
                        row.kek_id,
                        row.sealed,
                        row.created_at,
                        row.updated_at,
                        row.last_refresh_at,
                        row.last_error,
                        row.failure_count,
                    )
                )

    # -- pending flows -------------------------------------------------------------------

    def add_pending_flow(self, row: PendingFlowRow, max_per_user: int, now: float) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM pending_flows WHERE expires_at <= %s", (now,))
            conn.execute(
                f"INSERT INTO pending_flows ({_FLOW_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    row.state_hash,
                    row.user_id,
                    row.upstream_key,
                    row.created_at,
                    row.expires_at,
                    row.kek_id,
                    row.sealed,
                ),
            )
            conn.execute(
                "DELETE FROM pending_flows WHERE user_id = %s AND upstream_key = %s AND state_hash "
                "NOT IN (SELECT state_hash FROM pending_flows WHERE user_id = %s AND upstream_key = %s "
                "ORDER BY created_at DESC, seq DESC LIMIT %s)",
                (row.user_id, row.upstream_key, row.user_id, row.upstream_key, max_per_user),
            )

    def take_pending_flow(self, state_hash: str) -> PendingFlowRow | None:
        with self._write() as conn:
            found = conn.execute(
                f"DELETE FROM pending_flows WHERE state_hash = %s RETURNING {_FLOW_COLUMNS}", (state_hash,)
            ).fetchone()
            return None if found is None else _flow(found)

    # -- keys ----------------------------------------------------------------------------

    def sample_key_ids(self, limit: int) -> list[tuple[str, int]]:
        rows = self._read(
            "SELECT kek_id, SUM(n) FROM (SELECT kek_id, COUNT(*) AS n FROM credentials GROUP BY kek_id "
            "UNION ALL SELECT kek_id, COUNT(*) FROM pending_flows GROUP BY kek_id) AS used "
            "GROUP BY kek_id ORDER BY 2 DESC LIMIT %s",
            (limit,),
        )
        return [(str(k), int(n)) for k, n in rows]

    def sample_records(self, kek_id: str, limit: int) -> list[CredentialRow | PendingFlowRow]:
        creds: list[CredentialRow | PendingFlowRow] = [
            _cred(r)
            for r in self._read(
                f"SELECT {_CRED_COLUMNS} FROM credentials WHERE kek_id = %s LIMIT %s", (kek_id, limit)
            )
        ]
        flows = [
            _flow(r)
            for r in self._read(
                f"SELECT {_FLOW_COLUMNS} FROM pending_flows WHERE kek_id = %s LIMIT %s", (kek_id, limit)
            )
        ]
        return creds + flows

    # -- refresh coordination ------------------------------------------------------------

    def lock_refresh(self, user_id: str, upstream_key: str, timeout: float) -> RefreshLock | None:
        deadline = time.monotonic() + timeout
        key = _lock_key(user_id, upstream_key)
        try:
            conn = self.pool.getconn(timeout=max(0.01, timeout))
        except psycopg_pool.PoolTimeout:
            return None
        try:
            remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{remaining_ms}ms",))
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            finally:
                conn.execute("SET lock_timeout = '5s'")
        except psycopg.errors.LockNotAvailable:
            self.pool.putconn(conn)
            return None
        except psycopg.Error as exc:
            self._failed(exc)
            self.pool.putconn(conn)
            raise StoreError(f"refresh lock failed: {describe(exc)}") from None
        return _AdvisoryLock(self, conn, key)

    def close(self) -> None:
        self.pool.close()
