"""PostgreSQL backend: the same rows and sealed records as SQLite, shared by every replica.

psycopg 3 with its (synchronous) connection pool; connections run in autocommit mode so a read
is one round trip, and writes open an explicit transaction. The schema is versioned by the
one-row table ``credential_broker_schema``; migrations run under a transaction-scoped advisory
lock so two replicas starting together do not race.

Atomicity across replicas:
- ``save_credential`` with an expected generation is one ``UPDATE ... WHERE generation = %s``:
  under READ COMMITTED a concurrent writer waits for the row lock, then re-checks the WHERE on
  the committed row and matches nothing, so exactly one compare-and-swap wins.
- ``claim_refresh`` (the refresh lease, the same as SQLite's) is one ``UPDATE ... WHERE
  generation = %s AND <no live lease>``: a concurrent claimer waits for the row lock, re-checks
  the WHERE on the committed row and matches nothing, so exactly one process holds the lease.
  The lease is timed by the database's clock (``LEASE_CLOCK``), not the replicas'.

Errors: every psycopg/pool error becomes a StoreError (UNAVAILABLE) here, once. Messages carry
the error class and SQLSTATE, never the DSN or its password. After a connection failure, reads
stop waiting for the pool for a short while (they run on the event loop) and fail fast until a
connection comes back; the pool reconnects in the background by itself. A pooled connection the
server ended while idle (a restart, a failover) is never handed out, so none of them fails a call
once the database is back; a database that stops answering without a word fails a call within
seconds (``_NETWORK_DEFAULTS``); a replica frozen inside a write transaction has it ended by the
server within 2 s, releasing the locks every other replica's writes wait for.
"""

from __future__ import annotations

import json
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from broker.errors import StoreError
from broker.store.base import (
    CRED_COLUMNS,
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
from broker.store.upkeep import POSTGRES_MIGRATION, UpkeepQueries

# Moves with SQLite's SCHEMA_VERSION: migration n adds the same columns on both backends.
SCHEMA_VERSION = 7
_MIGRATION_LOCK = 0x63625F6D6967  # advisory lock id for migrations ("cb_mig")
_FLOW_INSERT_LOCK = 0x63625F666C6F  # advisory lock id for capped flow inserts ("cb_flo")
_EVENT_LOCK = 0x63625F657674  # advisory lock id for event inserts ("cb_evt")
#: The channel NOTIFY wakes event watchers on (broker/events.py).
EVENT_CHANNEL = "credential_broker_events"
_READ_WAIT_SECONDS = 1.0  # pool wait for a read on the event loop when the database is healthy
_SUSPECT_SECONDS = 2.0  # after a connection failure, reads fail fast for this long
_SUSPECT_READ_WAIT_SECONDS = 0.02
_WRITE_WAIT_SECONDS = 5.0
_RECONNECT_TIMEOUT_SECONDS = 2.0  # a pool slot gives up and is re-grown on demand after this

# Connection parameters a DSN does not set itself. A database that stops answering without a
# word (a network partition, a connection a NAT or load balancer dropped silently) is noticed in
# seconds rather than when TCP gives up, about 15 minutes later (Resolve reads on the event loop):
# data unacknowledged for ``tcp_user_timeout`` ms ends the connection (Linux), keepalives find a
# dead idle connection (and keep NAT mappings alive), and a connection attempt is bounded.
_NETWORK_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "tcp_user_timeout": 5000,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}

_CLEAR_LIFECYCLE = "next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL, needs_reauth_at = NULL"

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

# SQLite's migration 2: when to retry after a transient failure, and the refresh lease. Plus
# ``seq``, the stable scan position key rotation pages through (SQLite uses its rowid).
_MIGRATION_2 = (
    "ALTER TABLE credentials ADD COLUMN next_attempt_at double precision",
    "ALTER TABLE credentials ADD COLUMN lease_owner text",
    "ALTER TABLE credentials ADD COLUMN lease_until double precision",
    "ALTER TABLE credentials ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY",
    "CREATE UNIQUE INDEX credentials_seq ON credentials (seq)",
    "CREATE UNIQUE INDEX pending_flows_seq ON pending_flows (seq)",
)

# SQLite's _migrate_key_checks: one per-key check value per key id (broker/key_checks.py).
_MIGRATION_KEY_CHECKS = (
    """CREATE TABLE key_checks (
        kek_id text PRIMARY KEY,
        check_value bytea NOT NULL,
        created_at double precision
    )""",
)

# Each migration is a list of statements run in one transaction; index i is version i + 1.
MIGRATIONS: list[Sequence[str]] = [
    _MIGRATION_1,
    _MIGRATION_2,
    _MIGRATION_KEY_CHECKS,
    REFRESH_SCHEDULE_INDEXES,  # SQLite's _migrate_refresh_schedule: the refresher's scan indexes
    (  # SQLite's _migrate_events: connection events, written with the change they describe
        f"CREATE TABLE connection_events (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, {EVENT_COLUMNS})",
        EVENT_USER_INDEX,
    ),
    POSTGRES_MIGRATION,  # SQLite's _migrate_health_retention (broker/store/upkeep.py)
    HOSTED_CONNECT_MIGRATION,  # SQLite's _migrate_hosted_connect: /start reference, browser binding
]


def describe(exc: BaseException) -> str:
    """A safe description of a database error: its class and SQLSTATE, never the DSN."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return "no database connection available (the database may be unreachable)"
    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        return "the database is unreachable or the connection was lost"
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}" + (f" (SQLSTATE {state})" if state else "")


def _closed_while_idle(conn: psycopg.Connection[Any]) -> bool:
    """True when the server ended this idle pooled connection. Costs no round trip when it did
    not: an idle connection has nothing to read unless the server sent something (its
    termination message and end of file, or rarely a notice); only then is it asked."""
    if conn.closed:
        return True
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        if not poller.poll(0):
            return False
        conn.execute("")  # raises when the server is gone; consumes a harmless notice
    except (psycopg.Error, OSError, ValueError):
        return True
    return False


class PostgresStore(UpkeepQueries):
    """Credentials and pending flows in PostgreSQL, shared by every replica."""

    #: Reads go over the network and may wait on a lock: never made on the event loop.
    READS_MAY_WAIT = True

    schema_version = SCHEMA_VERSION
    PLACEHOLDER = "%s"
    INSERT_ORDER = "seq"
    # Replicas on different hosts judge a refresh lease by the database's clock, never their
    # own: clock_timestamp() is the time the statement runs (after any row-lock wait), where
    # now() would be the transaction's start.
    LEASE_CLOCK = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
    # Event inserts are serialized until commit, so sequences commit in order and a watcher that
    # read sequence n never later finds a smaller one; the lock is taken last in the writing
    # transaction (after its row locks) and held only until its commit. NOTIFY on commit.
    EVENT_LOCK = f"SELECT pg_advisory_xact_lock({_EVENT_LOCK})"
    EVENT_NOTIFY = f"NOTIFY {EVENT_CHANNEL}"

    def __init__(self, dsn: str, *, pool_size: int = 10, name: str = "credential-broker") -> None:
        self._dsn = dsn
        try:
            given = conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the PostgreSQL store: {describe(exc)}") from None
        self._network = {key: value for key, value in _NETWORK_DEFAULTS.items() if key not in given}
        self._suspect_until = 0.0
        self._lock = threading.Lock()
        self.pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "application_name": name, **self._network},
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
        # A transaction of ours never waits between its statements; one that does belongs to a
        # replica that froze or lost the database mid-write. The server ends it (releasing its
        # row locks and the event lock every replica's writes take) well within the others'
        # lock_timeout, instead of when TCP keepalive gives up, hours later.
        conn.execute("SET idle_in_transaction_session_timeout = '2s'")

    # -- connections ---------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
            self._suspect_until = time.monotonic() + _SUSPECT_SECONDS

    @contextmanager
    def _connection(self, wait: float, retry_wait: float) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection, waiting up to ``wait`` for one. One the server ended while it sat
        idle in the pool (a restart, a failover, pg_terminate_backend, a proxy's idle limit) is
        never handed out: it likely ended every idle one, so all are tested (the dead discarded
        and re-made in the background) and another is awaited up to ``retry_wait``."""
        with self.pool.connection(timeout=wait) as conn:
            if not _closed_while_idle(conn):
                yield conn
                return
            conn.close()  # the pool discards it when it comes back
        self._suspect_until = time.monotonic() + _SUSPECT_SECONDS
        self.pool.check()
        with self.pool.connection(timeout=retry_wait) as conn:
            yield conn

    def _read(self, query: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        """Run a read; a connection that turns out broken (database restarted) is retried once."""
        suspect = time.monotonic() < self._suspect_until
        wait = _SUSPECT_READ_WAIT_SECONDS if suspect else _READ_WAIT_SECONDS
        for attempt in (1, 2):
            try:
                with self._connection(wait, _SUSPECT_READ_WAIT_SECONDS) as conn:
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
        with self._write_statement() as conn, conn.transaction():
            yield conn

    @contextmanager
    def _write_statement(self) -> Iterator[psycopg.Connection[Any]]:
        # The connections are in autocommit mode: outside a transaction block, each statement is
        # its own transaction.
        try:
            with self._connection(_WRITE_WAIT_SECONDS, _WRITE_WAIT_SECONDS) as conn:
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

    def save_credential(
        self, row: CredentialRow, expected_generation: int | None, event: ConnectionEventRow | None = None
    ) -> int | None:
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
            row.refresh_token_expires_at,
        )
        with self._write() as conn:
            if expected_generation is not None:
                found = conn.execute(
                    "UPDATE credentials SET token_type = %s, scopes = %s, expires_at = %s, "
                    "obtained_via = %s, status = %s, kek_id = %s, sealed = %s, updated_at = %s, "
                    "last_refresh_at = %s, last_error = %s, failure_count = %s, refresh_token_expires_at = %s, "
                    f"generation = generation + 1, {_CLEAR_LIFECYCLE} "
                    "WHERE user_id = %s AND upstream_key = %s AND generation = %s RETURNING generation",
                    (*values, row.user_id, row.upstream_key, expected_generation),
                ).fetchone()
            else:
                found = conn.execute(
                    f"INSERT INTO credentials ({CRED_COLUMNS}, refresh_token_expires_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (user_id, upstream_key) DO UPDATE SET "
                    "token_type = EXCLUDED.token_type, scopes = EXCLUDED.scopes, "
                    "expires_at = EXCLUDED.expires_at, obtained_via = EXCLUDED.obtained_via, "
                    "status = EXCLUDED.status, kek_id = EXCLUDED.kek_id, sealed = EXCLUDED.sealed, "
                    "updated_at = EXCLUDED.updated_at, last_refresh_at = EXCLUDED.last_refresh_at, "
                    "last_error = EXCLUDED.last_error, failure_count = EXCLUDED.failure_count, "
                    "refresh_token_expires_at = EXCLUDED.refresh_token_expires_at, "
                    f"generation = credentials.generation + 1, {_CLEAR_LIFECYCLE} RETURNING generation",
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
                        row.refresh_token_expires_at,
                    ),
                ).fetchone()
            if found is not None and event is not None:
                self._add_event(conn, event)
            return None if found is None else int(found[0])

    def bulk_insert_credentials(self, rows: Sequence[CredentialRow]) -> None:
        """Load many new rows in one transaction with COPY (benchmarks, imports)."""
        with (
            self._write() as conn,
            conn.cursor().copy(f"COPY credentials ({CRED_COLUMNS}) FROM STDIN") as copy,
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

    def _serialize_flow_inserts(self, conn: Any) -> None:
        # Two replicas counting at once under READ COMMITTED could both see room for one more;
        # the lock is held until the inserting transaction ends.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FLOW_INSERT_LOCK,))

    def take_pending_flow(self, state_hash: str) -> PendingFlowRow | None:
        with self._write() as conn:
            found = conn.execute(
                f"DELETE FROM pending_flows WHERE state_hash = %s RETURNING {FLOW_COLUMNS}", (state_hash,)
            ).fetchone()
            return None if found is None else flow_from_row(found)

    # -- connection events (broker/events.py) ---------------------------------------------

    def listen_events(self, wake: Callable[[], None], stop: threading.Event) -> None:
        """Call ``wake()`` on every NOTIFY of an event commit, until ``stop`` is set. Runs in its
        own thread on its own connection (outside the pool). A lost connection is re-made after
        a pause, followed by one ``wake()``: events committed meanwhile are read then."""
        while not stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn, autocommit=True, application_name="credential-broker-listen", **self._network
                ) as conn:
                    conn.execute(f"LISTEN {EVENT_CHANNEL}")
                    wake()
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=0.5):
                            wake()
            except psycopg.Error:
                stop.wait(1.0)

    def close(self) -> None:
        self.pool.close()
