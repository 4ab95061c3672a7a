"""Statements the SQL backends run alike, written once with ``?`` placeholders.

Each backend supplies its connection handling (``_read``, ``_write``) and its placeholder style
(``PLACEHOLDER``: ``?`` for SQLite, ``%s`` for psycopg); everything else here is shared, so a
change to the store contract's semantics is made in one place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from broker.store.base import (
    CRED_SELECT,
    FLOW_COLUMNS,
    ConnectionEventRow,
    CredentialRow,
    DueCredential,
    PendingFlowRow,
    SealedRecord,
    credential_from_row,
    flow_from_row,
)

# When the background refresher should look at a credential next: its expiry, or a later retry
# time after a failed refresh (a backoff). The scan and the index use this exact expression.
REFRESH_DUE = "(CASE WHEN next_attempt_at > expires_at THEN next_attempt_at ELSE expires_at END)"
# Rows the refresher never scans: those that need reconnecting (and, for the expiry scan, those
# whose token does not expire). Written identically in the index and the query, so both
# SQLite's and PostgreSQL's planners see that the query implies the partial index.
_SCHEDULED = "status != 'needs_reauth' AND expires_at IS NOT NULL"
_KEPT_ALIVE = "status != 'needs_reauth' AND last_refresh_at IS NOT NULL"
# The events table (broker/events.py) beyond its sequence column, which each backend declares.
EVENT_COLUMNS = (
    "user_id text NOT NULL, upstream_key text NOT NULL, kind text NOT NULL, status text NOT NULL, "
    "last_error text, at double precision NOT NULL"
)
EVENT_USER_INDEX = "CREATE INDEX connection_events_user ON connection_events (user_id, seq)"
# Hosted connect (broker/connect/): a flow's one-time /start reference and the browser that
# opened it, both as SHA-256 hashes; the reference is looked up by its hash.
HOSTED_CONNECT_MIGRATION = (
    "ALTER TABLE pending_flows ADD COLUMN start_hash text",
    "ALTER TABLE pending_flows ADD COLUMN browser_hash text",
    "CREATE UNIQUE INDEX pending_flows_start ON pending_flows (start_hash)",
)
REFRESH_SCHEDULE_INDEXES = (
    f"CREATE INDEX credentials_refresh_due ON credentials (upstream_key, {REFRESH_DUE}) WHERE {_SCHEDULED}",
    f"CREATE INDEX credentials_keep_alive ON credentials (upstream_key, last_refresh_at) WHERE {_KEPT_ALIVE}",
)


class SharedQueries:
    """The backend-neutral part of a SQL store."""

    PLACEHOLDER = "?"
    # The column that orders rows by insertion (the tie-break between flows of the same instant).
    INSERT_ORDER = "rowid"
    # SQL for the database's "now" in epoch seconds, when the database's clock times refresh
    # leases; None: the claimer's clock (SQLite: every process sharing the file is on one host).
    LEASE_CLOCK: str | None = None

    def _read(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _write_statement(self) -> AbstractContextManager[Any]:
        """A connection for a write that is one statement (atomic on its own); by default the
        same as ``_write``. PostgreSQL runs it without BEGIN and COMMIT: two round trips fewer."""
        return self._write()

    @classmethod
    @functools.cache
    def _q(cls, sql: str) -> str:
        """``sql`` in this backend's placeholder style."""
        return sql if cls.PLACEHOLDER == "?" else sql.replace("?", cls.PLACEHOLDER)

    def get_credential(self, user_id: str, upstream_key: str) -> CredentialRow | None:
        rows = self._read(
            self._q(f"SELECT {self.CRED_READ} FROM credentials WHERE user_id = ? AND upstream_key = ?"),
            (user_id, upstream_key),
        )
        return credential_from_row(rows[0]) if rows else None

    def record_failure(
        self,
        user_id: str,
        upstream_key: str,
        status: str,
        error_class: str,
        generation: int,
        next_attempt_at: float | None = None,
        event: ConnectionEventRow | None = None,
    ) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                self._q(
                    "UPDATE credentials SET status = ?, last_error = ?, "
                    "failure_count = COALESCE(failure_count, 0) + 1, next_attempt_at = ?, "
                    "lease_owner = NULL, lease_until = NULL, "
                    # Since when it needs reconnecting (retention), from the event's time.
                    "needs_reauth_at = CASE WHEN ? = 'needs_reauth' THEN COALESCE(needs_reauth_at, ?) END "
                    "WHERE user_id = ? AND upstream_key = ? AND generation = ?"
                ),
                (
                    status,
                    error_class,
                    next_attempt_at,
                    status,
                    None if event is None else event.at,
                    user_id,
                    upstream_key,
                    generation,
                ),
            )
            if event is not None and cursor.rowcount == 1:
                self._add_event(conn, event)

    def claim_refresh(
        self,
        user_id: str,
        upstream_key: str,
        generation: int,
        owner: str,
        now: float,
        lease_seconds: float,
        failure_count: int | None = None,
    ) -> bool:
        # One statement. PostgreSQL: a concurrent claimer blocks on the row lock, then re-evaluates
        # the WHERE on the committed row (READ COMMITTED) and matches nothing; SQLite: the write
        # transaction is BEGIN IMMEDIATE, so claims are serialized.
        # With LEASE_CLOCK set, the database's clock times the lease (when it starts, whether it
        # ended) and ``now`` is unused, so replicas whose clocks disagree agree on the lease.
        clock = self.LEASE_CLOCK or "?"
        at: tuple[float, ...] = () if self.LEASE_CLOCK else (now,)
        # With failure_count: only if no failure was recorded since the claimer read the row (a
        # failure does not change the generation), so a claim made on a stale read fails.
        same_failures = "" if failure_count is None else " AND COALESCE(failure_count, 0) = ?"
        failures: tuple[int, ...] = () if failure_count is None else (failure_count,)
        with self._write_statement() as conn:
            cursor = conn.execute(
                self._q(
                    f"UPDATE credentials SET status = 'refreshing', lease_owner = ?, lease_until = {clock} + ? "
                    "WHERE user_id = ? AND upstream_key = ? AND generation = ? "
                    "AND status != 'needs_reauth' "
                    f"AND (lease_until IS NULL OR lease_until <= {clock} OR lease_owner = ?){same_failures}"
                ),
                (owner, *at, lease_seconds, user_id, upstream_key, generation, *at, owner, *failures),
            )
            return bool(cursor.rowcount == 1)

    def due_for_refresh(
        self, upstream_key: str, expires_before: float, now: float, limit: int
    ) -> list[DueCredential]:
        """Up to ``limit`` credentials of ``upstream_key``, soonest first, whose access token
        expires before ``expires_before`` and that are not waiting out a backoff at ``now``; never
        those that need reconnecting. One range scan of ``credentials_refresh_due``: the cost
        grows with ``limit`` (and with the few rows whose retry time falls between ``now`` and
        ``expires_before``), not with the number of credentials stored."""
        rows = self._read(
            self._q(
                f"SELECT {_DUE_COLUMNS} FROM credentials WHERE {_SCHEDULED} AND upstream_key = ? "
                f"AND {REFRESH_DUE} <= ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
                f"ORDER BY {REFRESH_DUE} LIMIT ?"
            ),
            (upstream_key, expires_before, now, limit),
        )
        return [_due(row) for row in rows]

    def defer_refresh(self, user_id: str, upstream_key: str, generation: int, until: float) -> None:
        """Leave a credential out of the refresher's scans until ``until`` (one that cannot be
        refreshed: no refresh token), if still at ``generation``; a later save undoes it."""
        with self._write() as conn:
            conn.execute(
                self._q(
                    "UPDATE credentials SET next_attempt_at = ? "
                    "WHERE user_id = ? AND upstream_key = ? AND generation = ?"
                ),
                (until, user_id, upstream_key, generation),
            )

    def idle_for_refresh(
        self, upstream_key: str, refreshed_before: float, now: float, limit: int
    ) -> list[DueCredential]:
        """Up to ``limit`` credentials of ``upstream_key``, longest idle first, last refreshed
        (or connected) before ``refreshed_before`` and not waiting out a backoff at ``now``;
        never those that need reconnecting. One range scan of ``credentials_keep_alive``."""
        rows = self._read(
            self._q(
                f"SELECT {_DUE_COLUMNS} FROM credentials WHERE {_KEPT_ALIVE} AND upstream_key = ? "
                "AND last_refresh_at <= ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
                "ORDER BY last_refresh_at LIMIT ?"
            ),
            (upstream_key, refreshed_before, now, limit),
        )
        return [_due(row) for row in rows]

    def delete_credential(
        self, user_id: str, upstream_key: str, event: ConnectionEventRow | None = None
    ) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                self._q("DELETE FROM credentials WHERE user_id = ? AND upstream_key = ?"),
                (user_id, upstream_key),
            )
            deleted = bool(cursor.rowcount > 0)
            if event is not None and deleted:
                self._add_event(conn, event)
            return deleted

    # -- connection events (broker/events.py) ---------------------------------------------

    # Run in the writing transaction before the event insert (PostgreSQL: a transaction-scoped
    # lock, so events commit in sequence order) and after it (PostgreSQL: NOTIFY, delivered on
    # commit, wakes the watchers of every replica). SQLite serializes writers already.
    EVENT_LOCK: str | None = None
    EVENT_NOTIFY: str | None = None

    def _add_event(self, conn: Any, event: ConnectionEventRow) -> None:
        if self.EVENT_LOCK:
            conn.execute(self.EVENT_LOCK)
        conn.execute(
            self._q(
                "INSERT INTO connection_events (user_id, upstream_key, kind, status, last_error, at) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (event.user_id, event.upstream_key, event.kind, event.status, event.last_error, event.at),
        )
        if self.EVENT_NOTIFY:
            conn.execute(self.EVENT_NOTIFY)

    def events_after(
        self, after_sequence: int, limit: int, user_id: str | None = None
    ) -> list[ConnectionEventRow]:
        where = "seq > ?" + (" AND user_id = ?" if user_id is not None else "")
        params: tuple[object, ...] = (after_sequence,) if user_id is None else (after_sequence, user_id)
        rows = self._read(
            self._q(
                "SELECT seq, user_id, upstream_key, kind, status, last_error, at FROM connection_events "
                f"WHERE {where} ORDER BY seq LIMIT ?"
            ),
            (*params, limit),
        )
        return [
            ConnectionEventRow(
                str(user),
                str(key),
                str(kind),
                str(status),
                None if err is None else str(err),
                float(at),
                int(seq),
            )
            for seq, user, key, kind, status, err, at in rows
        ]

    def last_event_sequence(self) -> int:
        rows = self._read("SELECT MAX(seq) FROM connection_events", ())
        return int(rows[0][0] or 0) if rows else 0

    def count_credentials(self, now: float) -> dict[str, int]:
        """Credentials by status; "connected" ones whose expiry has passed count as "expired"."""
        rows = self._read(
            self._q(
                "SELECT s, COUNT(*) FROM (SELECT CASE WHEN status = 'connected' AND expires_at IS NOT NULL "
                "AND expires_at <= ? THEN 'expired' ELSE status END AS s FROM credentials) AS c GROUP BY s"
            ),
            (now,),
        )
        return {str(status): int(count) for status, count in rows}

    def sample_key_ids(self, limit: int) -> list[tuple[str, int]]:
        rows = self._read(
            self._q(
                "SELECT kek_id, SUM(n) FROM (SELECT kek_id, COUNT(*) AS n FROM credentials GROUP BY kek_id "
                "UNION ALL SELECT kek_id, COUNT(*) FROM pending_flows GROUP BY kek_id) AS used "
                "GROUP BY kek_id ORDER BY 2 DESC LIMIT ?"
            ),
            (limit,),
        )
        return [(str(k), int(n)) for k, n in rows]

    def sample_records(self, kek_id: str, limit: int) -> list[CredentialRow | PendingFlowRow]:
        creds: list[CredentialRow | PendingFlowRow] = [
            credential_from_row(r)
            for r in self._read(
                self._q(f"SELECT {self.CRED_READ} FROM credentials WHERE kek_id = ? LIMIT ?"), (kek_id, limit)
            )
        ]
        flows = [
            flow_from_row(r)
            for r in self._read(
                self._q(f"SELECT {self.FLOW_READ} FROM pending_flows WHERE kek_id = ? LIMIT ?"),
                (kek_id, limit),
            )
        ]
        return creds + flows

    def _serialize_flow_inserts(self, conn: Any) -> None:
        """Make the count-then-insert of a capped flow insert atomic across writers. SQLite's
        BEGIN IMMEDIATE already does; PostgreSQL takes a transaction-scoped advisory lock."""

    def add_pending_flow(
        self, row: PendingFlowRow, max_per_user: int, now: float, max_total: int | None = None
    ) -> bool:
        with self._write() as conn:
            conn.execute(self._q("DELETE FROM pending_flows WHERE expires_at <= ?"), (now,))
            if max_total is not None:
                self._serialize_flow_inserts(conn)
                (count,) = conn.execute("SELECT COUNT(*) FROM pending_flows").fetchone()
                if int(count) >= max_total:
                    return False
            conn.execute(
                self._q(f"INSERT INTO pending_flows ({FLOW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (
                    row.state_hash,
                    row.user_id,
                    row.upstream_key,
                    row.created_at,
                    row.expires_at,
                    row.kek_id,
                    row.sealed,
                    row.start_hash,
                    row.browser_hash,
                ),
            )
            conn.execute(
                self._q(
                    "DELETE FROM pending_flows WHERE user_id = ? AND upstream_key = ? AND state_hash "
                    "NOT IN (SELECT state_hash FROM pending_flows WHERE user_id = ? AND upstream_key = ? "
                    f"ORDER BY created_at DESC, {self.INSERT_ORDER} DESC LIMIT ?)"
                ),
                (row.user_id, row.upstream_key, row.user_id, row.upstream_key, max_per_user),
            )
        return True

    def newest_pending_flow(self, user_id: str, upstream_key: str, now: float) -> PendingFlowRow | None:
        rows = self._read(
            self._q(
                f"SELECT {self.FLOW_READ} FROM pending_flows WHERE user_id = ? AND upstream_key = ? "
                f"AND expires_at > ? ORDER BY created_at DESC, {self.INSERT_ORDER} DESC LIMIT 1"
            ),
            (user_id, upstream_key, now),
        )
        return flow_from_row(rows[0]) if rows else None

    # -- hosted connect (broker/connect/) --------------------------------------------------

    def get_pending_flow(self, state_hash: str) -> PendingFlowRow | None:
        rows = self._read(
            self._q(f"SELECT {self.FLOW_READ} FROM pending_flows WHERE state_hash = ?"), (state_hash,)
        )
        return flow_from_row(rows[0]) if rows else None

    def bind_pending_flow(self, start_hash: str, browser_hash: str, now: float) -> PendingFlowRow | None:
        # PostgreSQL: a concurrent binder waits for the row lock, then re-checks the UPDATE's WHERE
        # on the committed row (browser_hash is set) and matches nothing. SQLite: BEGIN IMMEDIATE.
        with self._write() as conn:
            found = conn.execute(
                self._q(
                    f"SELECT {self.FLOW_READ} FROM pending_flows WHERE start_hash = ? "
                    "AND browser_hash IS NULL AND expires_at > ?"
                ),
                (start_hash, now),
            ).fetchone()
            if found is None:
                return None
            row = flow_from_row(found)
            cursor = conn.execute(
                self._q(
                    "UPDATE pending_flows SET browser_hash = ?, start_hash = NULL "
                    "WHERE state_hash = ? AND start_hash = ? AND browser_hash IS NULL"
                ),
                (browser_hash, row.state_hash, start_hash),
            )
            if cursor.rowcount != 1:
                return None
        return dataclasses.replace(row, start_hash=None, browser_hash=browser_hash)

    def take_bound_flow(self, state_hash: str, browser_hash: str) -> PendingFlowRow | None:
        with self._write() as conn:
            found = conn.execute(
                self._q(
                    f"SELECT {self.FLOW_READ} FROM pending_flows WHERE state_hash = ? AND browser_hash = ?"
                ),
                (state_hash, browser_hash),
            ).fetchone()
            if found is None:
                return None
            cursor = conn.execute(
                self._q("DELETE FROM pending_flows WHERE state_hash = ? AND browser_hash = ?"),
                (state_hash, browser_hash),
            )
            return flow_from_row(found) if cursor.rowcount == 1 else None

    def purge_expired_flows(self, now: float, batch_size: int = 1000) -> int:
        # In batches, so no one transaction holds the write lock for long.
        purged = 0
        while True:
            with self._write() as conn:
                cursor = conn.execute(
                    self._q(
                        "DELETE FROM pending_flows WHERE state_hash IN (SELECT state_hash FROM "
                        "pending_flows WHERE expires_at <= ? LIMIT ?)"
                    ),
                    (now, batch_size),
                )
                deleted = max(int(cursor.rowcount), 0)
            purged += deleted
            if deleted < batch_size:
                return purged

    def reclaim_space(self) -> None:
        return None

    # -- keys ----------------------------------------------------------------------------

    def sealed_records(self, after_position: int, limit: int, skip_kek_id: str) -> list[SealedRecord]:
        # One position space over both tables: credentials take even positions (insertion order
        # * 2), flows odd ones (* 2 + 1), so a single cursor pages through both.
        order = self.INSERT_ORDER
        rows = self._read(
            self._q(
                "SELECT * FROM ("
                f"SELECT {order} * 2 AS pos, 'credentials' AS t, user_id, upstream_key AS k, kek_id, "
                f"generation, sealed, upstream_key AS u FROM credentials WHERE kek_id != ? AND {order} * 2 > ? "
                "UNION ALL "
                f"SELECT {order} * 2 + 1, 'pending_flows', user_id, state_hash, kek_id, 0, sealed, upstream_key "
                f"FROM pending_flows WHERE kek_id != ? AND {order} * 2 + 1 > ?"
                ") AS r ORDER BY pos LIMIT ?"
            ),
            (skip_kek_id, after_position, skip_kek_id, after_position, limit),
        )
        return [
            SealedRecord(str(t), str(u), str(k), str(kid), int(g), bytes(sealed), int(pos), str(up))
            for pos, t, u, k, kid, g, sealed, up in rows
        ]

    def replace_sealed(self, updates: list[tuple[SealedRecord, str, bytes]]) -> int:
        for record, _, _ in updates:
            if record.table not in ("credentials", "pending_flows"):
                raise ValueError(f"unknown table {record.table!r}")
        written = 0
        with self._write() as conn:
            for record, kek_id, sealed in updates:
                if record.table == "credentials":
                    cursor = conn.execute(
                        self._q(
                            "UPDATE credentials SET kek_id = ?, sealed = ? WHERE user_id = ? AND "
                            "upstream_key = ? AND kek_id = ? AND generation = ?"
                        ),
                        (kek_id, sealed, record.user_id, record.record_key, record.kek_id, record.generation),
                    )
                else:
                    cursor = conn.execute(
                        self._q(
                            "UPDATE pending_flows SET kek_id = ?, sealed = ? WHERE state_hash = ? AND "
                            "user_id = ? AND kek_id = ? AND sealed = ? AND upstream_key = ?"
                        ),
                        (
                            kek_id,
                            sealed,
                            record.record_key,
                            record.user_id,
                            record.kek_id,
                            record.sealed,
                            record.upstream_key,
                        ),
                    )
                written += cursor.rowcount
        return written

    # -- per-key check values (broker/key_checks.py) --------------------------------------

    # The sealed column read as bytes whatever a damaged row holds (SQLite can hold text there),
    # and the column lists that reads select with it.
    SEALED_AS_BYTES = "sealed"
    CRED_READ = CRED_SELECT
    FLOW_READ = FLOW_COLUMNS

    def key_checks(self) -> dict[str, bytes]:
        rows = self._read(self._q("SELECT kek_id, check_value FROM key_checks"), ())
        return {str(kid): bytes(value) for kid, value in rows}

    def add_key_check(self, kek_id: str, check_value: bytes, now: float) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                self._q(
                    "INSERT INTO key_checks (kek_id, check_value, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (kek_id) DO NOTHING"
                ),
                (kek_id, check_value, now),
            )
            return bool(cursor.rowcount == 1)

    def replace_key_check(self, kek_id: str, expected: bytes, check_value: bytes, now: float) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                self._q(
                    "UPDATE key_checks SET check_value = ?, created_at = ? "
                    "WHERE kek_id = ? AND check_value = ?"
                ),
                (check_value, now, kek_id, expected),
            )
            return bool(cursor.rowcount == 1)

    def delete_key_check(self, kek_id: str) -> None:
        with self._write() as conn:
            conn.execute(self._q("DELETE FROM key_checks WHERE kek_id = ?"), (kek_id,))

    def sealed_records_under(self, kek_id: str, after_position: int, limit: int) -> list[SealedRecord]:
        order, sealed = self.INSERT_ORDER, self.SEALED_AS_BYTES
        rows = self._read(
            self._q(
                "SELECT * FROM ("
                f"SELECT {order} * 2 AS pos, 'credentials' AS t, user_id, upstream_key AS k, kek_id, "
                f"generation, {sealed}, upstream_key AS u FROM credentials WHERE kek_id = ? AND {order} * 2 > ? "
                "UNION ALL "
                f"SELECT {order} * 2 + 1, 'pending_flows', user_id, state_hash, kek_id, 0, {sealed}, upstream_key "
                f"FROM pending_flows WHERE kek_id = ? AND {order} * 2 + 1 > ?"
                ") AS r ORDER BY pos LIMIT ?"
            ),
            (kek_id, after_position, kek_id, after_position, limit),
        )
        return [
            SealedRecord(str(t), str(u), str(k), str(kid), int(g), bytes(sealed), int(pos), str(up))
            for pos, t, u, k, kid, g, sealed, up in rows
        ]


_DUE_COLUMNS = "user_id, upstream_key, expires_at, last_refresh_at"


def _due(row: Sequence[Any]) -> DueCredential:
    user, key, expires, last = row
    return DueCredential(
        str(user),
        str(key),
        None if expires is None else float(expires),
        None if last is None else float(last),
    )
