"""A replica that stops in the middle of a write transaction (its host partitioned from the
database, its process frozen or paused) must not stop every other replica's writes: PostgreSQL
notices a dead client only when TCP keepalive gives up (two hours by default), and until then the
frozen transaction keeps its locks, the event lock that every connect, refresh and disconnect of
every replica takes among them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from broker.store.base import ConnectionEventRow, CredentialRow
from broker.store.postgres import _EVENT_LOCK, PostgresStore

KEY = "gh_0011223344556677"


def _row(user: str) -> CredentialRow:
    return CredentialRow(
        user, KEY, "Bearer", ("repo",), 2e9, "connect_flow", "connected", 0, "k1", b"sealed", 1e9, 1e9
    )


def _event(user: str) -> ConnectionEventRow:
    return ConnectionEventRow(user, KEY, "connected", "connected", None, 1e9)


@pytest.fixture
def replicas(pg_dsn: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    a, b = PostgresStore(pg_dsn, pool_size=2), PostgresStore(pg_dsn, pool_size=2)
    yield a, b
    a.close()
    b.close()


def test_a_replica_frozen_inside_a_write_does_not_block_the_others(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    a.save_credential(_row("alice"), None, _event("alice"))
    # Replica A, mid-write, as its store does it (a connection from its pool, so its settings):
    # the credential row updated and the event lock taken; then it is heard from no more.
    frozen = a.pool.getconn(timeout=5)
    try:
        frozen.execute("BEGIN")
        frozen.execute("UPDATE credentials SET status = 'refreshing' WHERE user_id = 'alice'")
        frozen.execute("SELECT pg_advisory_xact_lock(%s)", (_EVENT_LOCK,))
        started = time.monotonic()
        # Replica B connects another user, and then refreshes alice (its row lock too).
        assert b.save_credential(_row("bob"), None, _event("bob")) == 1
        assert b.save_credential(_row("alice"), 1, _event("alice")) == 2
        assert time.monotonic() - started < 10
        assert [e.user_id for e in b.events_after(0, 10)] == ["alice", "bob", "alice"]
    finally:
        a.pool.putconn(frozen)
