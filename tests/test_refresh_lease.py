"""The cross-process refresh lease on both backends: exclusive across replicas sharing a store,
expiring with a crashed holder, released by a save or a failure; and the service's bounded wait
for another process's lease, which re-reads the row before failing UNAVAILABLE."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.crypto import EnvelopeCipher
from broker.crypto.keyring import Keyring, new_key_entry
from broker.models import Credential, Secrets
from broker.store import SqliteStore
from broker.vault import CredentialVault
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info

KEY = "gh_0011223344556677"


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


def _open(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if backend == "postgres":
        from broker.store.postgres import PostgresStore

        return PostgresStore(request.getfixturevalue("pg_dsn"), pool_size=4)
    return SqliteStore(tmp_path / "data" / "broker.db")


@pytest.fixture
def replicas(store_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Two stores on one database (or one SQLite file): two replicas."""
    a = _open(store_backend, request, tmp_path)
    b = _open(store_backend, request, tmp_path)
    yield a, b
    a.close()
    b.close()


def _seed(store: Any) -> int:
    cipher = EnvelopeCipher(Keyring([new_key_entry("primary")]))
    credential = Credential(
        "alice", KEY, Secrets("at-1", "rt-1"), "Bearer", ("repo",), 2e9, "connect_flow", 1e9
    )
    generation = CredentialVault(store, cipher).save(credential, None, 1e9)
    assert generation is not None
    return generation


def test_one_claimer_wins_across_replicas(replicas: tuple[Any, Any]) -> None:
    a, b = replicas
    generation = _seed(a)
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        if (a, b)[i % 2].claim_refresh("alice", KEY, generation, f"owner-{i}", 100.0, 30.0):
            wins.append(f"owner-{i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    row = b.get_credential("alice", KEY)
    assert row.status == "refreshing"
    assert not b.claim_refresh("alice", KEY, generation, "late", 120.0, 30.0)  # lease still live
    assert not a.claim_refresh("alice", KEY, generation + 1, "x", 200.0, 30.0)  # wrong generation


def test_a_crashed_holders_lease_expires(replicas: tuple[Any, Any], store_backend: str) -> None:
    a, b = replicas
    generation = _seed(a)
    if store_backend == "sqlite":  # judged by the claimer's clock (one host shares one file)
        assert a.claim_refresh("alice", KEY, generation, "crashed", 100.0, 30.0)
        assert not b.claim_refresh("alice", KEY, generation, "late", 129.0, 30.0)
        assert b.claim_refresh("alice", KEY, generation, "late", 131.0, 30.0)
        return
    # PostgreSQL judges by the database's clock: the lease runs 0.5 s whatever the claimers say.
    assert a.claim_refresh("alice", KEY, generation, "crashed", time.time(), 0.5)
    assert not b.claim_refresh("alice", KEY, generation, "late", time.time(), 30.0)
    time.sleep(0.7)
    assert b.claim_refresh("alice", KEY, generation, "late", time.time(), 30.0)


def test_postgres_lease_expiry_is_judged_by_the_database_clock(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Replicas whose clocks disagree with the database (ahead, behind) still see one lease."""
    a = _open("postgres", request, tmp_path)
    b = _open("postgres", request, tmp_path)
    try:
        generation = _seed(a)
        behind, ahead = time.time() - 3600, time.time() + 3600
        assert a.claim_refresh("alice", KEY, generation, "slow-clock", behind, 30.0)
        # A replica an hour ahead would think that lease long expired; the database knows better.
        assert not b.claim_refresh("alice", KEY, generation, "fast-clock", ahead, 30.0)
        (until,) = a._read("SELECT lease_until FROM credentials WHERE user_id = %s", ("alice",))[0]
        assert abs(until - (time.time() + 30.0)) < 5.0  # the database's now, not the claimer's
    finally:
        a.close()
        b.close()


def test_failure_and_save_release_the_lease(replicas: tuple[Any, Any]) -> None:
    a, b = replicas
    generation = _seed(a)
    assert a.claim_refresh("alice", KEY, generation, "one", 100.0, 30.0)
    a.record_failure("alice", KEY, "error", "http_5xx", generation, next_attempt_at=105.0)
    row = b.get_credential("alice", KEY)
    assert (row.status, row.last_error, row.failure_count, row.next_attempt_at) == (
        "error",
        "http_5xx",
        1,
        105.0,
    )
    assert b.claim_refresh("alice", KEY, generation, "two", 101.0, 30.0)  # released by the failure
    saved = b.save_credential(row, generation)
    assert saved == generation + 1
    fresh = a.get_credential("alice", KEY)
    assert fresh.next_attempt_at is None  # a save resets the backoff ...
    assert a.claim_refresh("alice", KEY, saved, "three", 102.0, 30.0)  # ... and releases the lease


def _take_lease(broker: Broker, owner: str = "another-replica") -> None:
    store = broker.app.store  # the same database another replica would share
    row = store.get_credential("alice", broker.app.config.upstreams[0].key)
    assert store.claim_refresh(
        row.user_id, row.upstream_key, row.generation, owner, broker.clock.now(), 600.0
    )


async def test_waiter_is_bounded_and_fails_unavailable(
    make_broker: BrokerFactory, store_doc: dict[str, Any]
) -> None:
    broker = await make_broker(store={**store_doc, "lock_timeout_seconds": 0.5})
    await _stale_connected(broker)
    _take_lease(broker)
    before = len(broker.auth.token_requests("refresh_token"))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.stub.Refresh(_refresh_request())
    waited = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "UPSTREAM_UNAVAILABLE"
    assert 0.4 <= waited < 5.0
    assert len(broker.auth.token_requests("refresh_token")) == before  # never presented


async def test_waiter_takes_the_holders_fresh_credential(
    make_broker: BrokerFactory, store_doc: dict[str, Any]
) -> None:
    broker = await make_broker(store={**store_doc, "lock_timeout_seconds": 5})
    await _stale_connected(broker)
    _take_lease(broker)
    before = len(broker.auth.token_requests("refresh_token"))
    waiting = asyncio.create_task(broker.resolve("alice"))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # waiting for the other replica's refresh
    # The other replica finishes: it writes a fresh credential (and so releases the lease).
    vault = broker.app.vault
    found = vault.get("alice", broker.app.config.upstreams[0].key)
    assert found is not None
    credential, row = found
    fresh = Credential(
        credential.user_id,
        credential.upstream_key,
        Secrets("at-from-the-other-replica", "rt-rotated-elsewhere"),
        credential.token_type,
        credential.scopes,
        broker.clock.now() + 3600,
        credential.obtained_via,
        broker.clock.now(),
    )
    assert await asyncio.to_thread(vault.save, fresh, row.generation, broker.clock.now()) is not None
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.access_token == "at-from-the-other-replica"
    assert len(broker.auth.token_requests("refresh_token")) == before


# -- helpers --------------------------------------------------------------------------------------


def _refresh_request() -> Any:
    from broker._proto.credentialbroker.v1 import broker_pb2 as pb

    return pb.RefreshRequest(user_id="alice", upstream=UPSTREAM)


async def _stale_connected(broker: Broker) -> None:
    broker.auth.access_ttl = 30  # inside the refresh window at once
    await broker.connect("alice")
    broker.auth.access_ttl = 3600


def test_a_claim_made_on_a_stale_read_fails(replicas: tuple[Any, Any]) -> None:
    """A failure recorded between a claimer's read and its claim (the generation does not
    change) voids the claim: the claimer must look again, and see the backoff."""
    a, b = replicas
    generation = _seed(a)
    read = b.get_credential("alice", KEY)  # b reads while a holds the lease ...
    assert a.claim_refresh("alice", KEY, generation, "holder", time.time(), 30.0)
    a.record_failure("alice", KEY, "error", "timeout", generation, next_attempt_at=time.time() + 60)
    # ... and claims after a's failure released it: refused, the row is not what b read.
    assert not b.claim_refresh("alice", KEY, generation, "waiter", time.time(), 30.0, read.failure_count)
    again = b.get_credential("alice", KEY)
    assert b.claim_refresh("alice", KEY, generation, "waiter", time.time(), 30.0, again.failure_count)


@pytest.mark.parametrize("rpc", ["Refresh", "Resolve"])
async def test_a_waiter_does_not_present_the_token_after_the_holders_refresh_failed(
    make_broker: BrokerFactory, store_doc: dict[str, Any], rpc: str
) -> None:
    broker = await make_broker(store={**store_doc, "lock_timeout_seconds": 5})
    await _stale_connected(broker)
    _take_lease(broker)
    before = len(broker.auth.token_requests("refresh_token"))
    cached = broker.app.vault.get("alice", broker.app.config.upstreams[0].key)
    assert cached is not None
    call = broker.stub.Refresh(_refresh_request()) if rpc == "Refresh" else broker.resolve("alice")
    waiting = asyncio.ensure_future(call)
    await asyncio.sleep(0.3)
    assert not waiting.done()
    # The other replica's request timed out: it records the failure, which releases the lease.
    row = cached[1]
    broker.app.store.record_failure(
        "alice", row.upstream_key, "error", "timeout", row.generation, broker.clock.now() + 60
    )
    if rpc == "Refresh":
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(waiting, 5)
        assert error_info(caught.value).reason == "UPSTREAM_UNAVAILABLE"
    else:  # the cached token is still valid for 30 s: it is served
        answer = await asyncio.wait_for(waiting, 5)
        assert answer.access_token == cached[0].secrets.access_token
    assert len(broker.auth.token_requests("refresh_token")) == before  # never presented again
