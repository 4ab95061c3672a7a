"""PostgreSQL connections the server closed while they sat idle in the pool (a database restart,
a failover, ``pg_terminate_backend``): once the database answers again, no store call may fail
because it was handed one of them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from broker.errors import StoreError
from broker.store.base import CredentialRow
from broker.store.postgres import PostgresStore
from tests.pgcluster import PgCluster, fresh_schema

KEY = "gh_0011223344556677"
POOL = 6


def _row(user: str) -> CredentialRow:
    return CredentialRow(
        user, KEY, "Bearer", ("repo",), 2e9, "connect_flow", "connected", 0, "k1", b"sealed", 1e9, 1e9
    )


@pytest.fixture
def store(pg_dsn: str) -> Iterator[PostgresStore]:
    # Its own application_name, so the test ends this store's connections and no one else's.
    s = PostgresStore(pg_dsn, pool_size=POOL, name=f"cb-test-{uuid.uuid4().hex[:8]}")
    yield s
    s.close()


def _fill_pool(store: PostgresStore) -> None:
    """Open every connection the pool may hold, and give them all back idle."""
    conns = [store.pool.getconn(timeout=5) for _ in range(POOL)]
    for conn in conns:
        store.pool.putconn(conn)
    assert store.pool.get_stats()["pool_available"] == POOL


def _terminate(pg_dsn: str, application_name: str) -> None:
    """End the store's server sessions as a restart or an operator would, and wait until gone."""
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM pg_stat_activity "
            "WHERE application_name = %s OFFSET 0) AS mine",
            (application_name,),
        ).fetchone()
        assert ended is not None and ended[0] == POOL
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_writes_after_the_servers_sessions_were_ended_all_succeed(store: PostgresStore, pg_dsn: str) -> None:
    store.save_credential(_row("alice"), None)
    _fill_pool(store)
    _terminate(pg_dsn, store.pool.kwargs["application_name"])
    # The database is up: every write goes through (the reference lost one per pooled connection,
    # so a refresh whose new refresh token was then not stored would lose the grant).
    for i in range(POOL + 2):
        assert store.save_credential(_row(f"user-{i}"), None) == 1


def test_reads_after_the_servers_sessions_were_ended_all_succeed(store: PostgresStore, pg_dsn: str) -> None:
    store.save_credential(_row("alice"), None)
    _fill_pool(store)
    _terminate(pg_dsn, store.pool.kwargs["application_name"])
    # Reads run on the event loop and wait only briefly for a new connection after finding a
    # dead one (so an outage is answered fast): at most that first read may fail, not one per
    # pooled connection.
    failed = 0
    for _ in range(POOL + 2):
        try:
            found = store.get_credential("alice", KEY)
        except StoreError:
            failed += 1
            time.sleep(0.05)
            continue
        assert found is not None and found.user_id == "alice"
    assert failed <= 1


def test_a_claim_after_the_servers_sessions_were_ended_succeeds(store: PostgresStore, pg_dsn: str) -> None:
    store.save_credential(_row("alice"), None)
    _fill_pool(store)
    _terminate(pg_dsn, store.pool.kwargs["application_name"])
    assert store.claim_refresh("alice", KEY, 1, "owner-a", 0.0, 15.0)


def test_every_write_after_a_database_restart_succeeds(pg_cluster: PgCluster) -> None:
    with fresh_schema(pg_cluster.dsn) as dsn:
        s = PostgresStore(dsn, pool_size=POOL)
        try:
            s.save_credential(_row("alice"), None)
            _fill_pool(s)
            pg_cluster.stop("fast")
            pg_cluster.start()
            for i in range(POOL + 2):
                assert s.save_credential(_row(f"user-{i}"), None) == 1
            found = s.get_credential("user-0", KEY)
            assert found is not None
        finally:
            s.close()
