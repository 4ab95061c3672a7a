"""Statements for connection upkeep, shared by both SQL backends: the last-used stamp that
Resolve writes (at most once a minute per credential), and retention (broker/retention.py):
credentials that have needed reconnecting for too long, and old connection events.

Migration 6 (``HEALTH_AND_RETENTION``) adds what they need:
- ``credentials.refresh_token_expires_at`` and ``credentials.last_used_at`` (connection health);
- ``credentials.needs_reauth_at``: when the credential last became needs_reauth (set by
  ``record_failure``, cleared by a save), with a partial index for the reaper's range scan;
  rows already needs_reauth are stamped with the migration's time, so nothing is deleted
  earlier than the configured limit after an upgrade;
- an index on ``connection_events.at`` (the age cut), and ``event_retention``, one row holding
  the highest sequence retention deleted: a watcher asking to resume below it is told to
  resynchronise instead of silently missing events.
"""

from __future__ import annotations

from broker.store.base import ConnectionEventRow
from broker.store.sql import SharedQueries

# Column types both databases accept (SQLite gives them REAL / INTEGER affinity).
_COMMON = (
    "ALTER TABLE credentials ADD COLUMN refresh_token_expires_at double precision",
    "ALTER TABLE credentials ADD COLUMN last_used_at double precision",
    "ALTER TABLE credentials ADD COLUMN needs_reauth_at double precision",
    "CREATE INDEX credentials_needs_reauth ON credentials (needs_reauth_at) WHERE status = 'needs_reauth'",
    "CREATE INDEX connection_events_at ON connection_events (at)",
    "CREATE TABLE event_retention (id integer PRIMARY KEY, trimmed_through bigint NOT NULL)",
    "INSERT INTO event_retention (id, trimmed_through) VALUES (1, 0)",
)
SQLITE_MIGRATION = (
    *_COMMON,
    "UPDATE credentials SET needs_reauth_at = CAST(strftime('%s', 'now') AS REAL) WHERE status = 'needs_reauth'",
)
POSTGRES_MIGRATION = (
    *_COMMON,
    "UPDATE credentials SET needs_reauth_at = EXTRACT(EPOCH FROM now()) WHERE status = 'needs_reauth'",
)


class UpkeepQueries(SharedQueries):
    """Usage stamps and retention, on top of the shared statements."""

    def touch_last_used(self, user_id: str, upstream_key: str, now: float, not_since: float) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                self._q(
                    "UPDATE credentials SET last_used_at = ? WHERE user_id = ? AND upstream_key = ? "
                    "AND (last_used_at IS NULL OR last_used_at <= ?)"
                ),
                (now, user_id, upstream_key, not_since),
            )
            return bool(cursor.rowcount == 1)

    def needs_reauth_before(self, cutoff: float, limit: int) -> list[tuple[str, str, float]]:
        rows = self._read(
            self._q(
                "SELECT user_id, upstream_key, needs_reauth_at FROM credentials "
                "WHERE status = 'needs_reauth' AND needs_reauth_at <= ? ORDER BY needs_reauth_at LIMIT ?"
            ),
            (cutoff, limit),
        )
        return [(str(user), str(key), float(at)) for user, key, at in rows]

    def delete_needs_reauth(
        self, user_id: str, upstream_key: str, cutoff: float, event: ConnectionEventRow | None = None
    ) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                self._q(
                    "DELETE FROM credentials WHERE user_id = ? AND upstream_key = ? "
                    "AND status = 'needs_reauth' AND needs_reauth_at <= ?"
                ),
                (user_id, upstream_key, cutoff),
            )
            deleted = bool(cursor.rowcount > 0)
            if event is not None and deleted:
                self._add_event(conn, event)
            return deleted

    def events_to_trim(self, before: float, keep: int) -> tuple[int, int]:
        by_age = self._read(self._q("SELECT MAX(seq) FROM connection_events WHERE at <= ?"), (before,))
        by_count = self._read(
            self._q("SELECT seq FROM connection_events ORDER BY seq DESC LIMIT 1 OFFSET ?"), (keep,)
        )
        through = max(int(by_age[0][0] or 0) if by_age else 0, int(by_count[0][0]) if by_count else 0)
        if through == 0:
            return 0, 0
        (count,) = self._read(self._q("SELECT COUNT(*) FROM connection_events WHERE seq <= ?"), (through,))[0]
        return through, int(count)

    def trim_events(self, through_sequence: int, batch_size: int = 1000) -> int:
        # In batches, so no one transaction holds the write lock for long; the mark is raised in
        # each batch's transaction, before any event it covers is gone.
        trimmed = 0
        while True:
            with self._write() as conn:
                cursor = conn.execute(
                    self._q(
                        "DELETE FROM connection_events WHERE seq IN (SELECT seq FROM connection_events "
                        "WHERE seq <= ? ORDER BY seq LIMIT ?)"
                    ),
                    (through_sequence, batch_size),
                )
                deleted = max(int(cursor.rowcount), 0)
                if deleted:
                    conn.execute(
                        self._q(
                            "UPDATE event_retention SET trimmed_through = ? WHERE id = 1 AND trimmed_through < ?"
                        ),
                        (through_sequence, through_sequence),
                    )
            trimmed += deleted
            if deleted < batch_size:
                return trimmed

    def events_trimmed_through(self) -> int:
        rows = self._read("SELECT trimmed_through FROM event_retention WHERE id = 1", ())
        return int(rows[0][0]) if rows else 0
