"""Pending flows are bounded across users (issue 12, item 7).

``max_pending_flows_total`` caps the live flows of every user together: past it, a new flow is
refused with RESOURCE_EXHAUSTED and counted, and nobody's flow is evicted for someone else's.
Expired flows are purged on a timer, and a SQLite file gives the freed pages back.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.clock import ManualClock
from broker.flow_purge import FlowPurger
from broker.models import PendingFlow
from broker.store import open_store
from broker.store.base import PendingFlowRow
from broker.store.sqlite import SqliteStore
from tests.conftest import Broker, BrokerFactory, error_info

REFUSED = "credential_broker_pending_flows_refused_total"


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends unless it says otherwise."""
    return str(request.param)


@pytest.fixture
def make_broker_stores(store_doc: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """Two stores on one database, as two broker processes (or replicas) would open it."""
    from broker.config import StoreConfig

    config = StoreConfig.model_validate(store_doc)
    a, b = open_store(config), open_store(config)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _flows(broker: Broker) -> int:
    return int(broker.query("SELECT COUNT(*) FROM pending_flows")[0][0])


def _scrape(broker: Broker, name: str) -> float:
    """A sample's value from the broker's real /metrics endpoint (0 when absent)."""
    with urllib.request.urlopen(f"http://{broker.app.metrics_address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


async def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a bound, not a speed target)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def test_cap_refuses_new_flows_and_keeps_existing_ones(make_broker: BrokerFactory) -> None:
    broker = await make_broker(
        max_pending_flows_total=50, flow_purge_interval_seconds=0.1, metrics={"listen": "127.0.0.1:0"}
    )
    started = [await broker.start_flow(f"user-{i}") for i in range(50)]
    assert _flows(broker) == 50 and _scrape(broker, REFUSED) == 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.start_flow("newcomer")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(info.value).reason == "TOO_MANY_PENDING_FLOWS"
    assert "max_pending_flows_total" in info.value.details()
    # A Resolve that would need a new flow is refused the same way.
    with pytest.raises(grpc.aio.AioRpcError) as resolved:
        await broker.resolve("another-newcomer")
    assert resolved.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A user who started one still gets their flow back from Resolve: no new row is needed.
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await broker.resolve("user-7")
    assert error_info(reused.value).metadata["authorization_url"] == started[7].authorization_url
    assert _flows(broker) == 50 and _scrape(broker, REFUSED) == 2
    # Every existing flow is still there and completes.
    for i in (0, 7, 49):
        callback = await asyncio.to_thread(broker.auth.authorize, started[i].authorization_url, f"user-{i}")
        await broker.stub.Complete(
            pb.CompleteRequest(state=started[i].state, code=callback["code"], user_id=f"user-{i}")
        )
    # Completing made room: a new flow fits again.
    await broker.start_flow("newcomer")
    assert _flows(broker) == 48
    # The timer purges expired flows (no insert needed), then new users fit again.
    broker.clock.advance(601)
    assert await _wait_for(lambda: _flows(broker) == 0)
    for i in range(50):
        await broker.start_flow(f"later-{i}")
    assert _scrape(broker, REFUSED) == 2


@pytest.mark.parametrize("store_backend", ["sqlite"])
async def test_purge_gives_sqlite_space_back(make_broker: BrokerFactory) -> None:
    broker = await make_broker(flow_purge_interval_seconds=0.1)
    path = broker.db_path
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    finally:
        conn.close()
    now = broker.clock.now()

    def fill() -> None:
        for i in range(4000):
            flow = PendingFlow(f"{i:064x}", f"user-{i}", "gh_k", "v" * 64, now, now + 600, "s" * 43)
            broker.app.vault.add_flow(flow, 5, now)

    await asyncio.to_thread(fill)
    await broker.connect("alice")  # a credential, kept through the purge
    await asyncio.to_thread(_checkpoint, path)
    full = path.stat().st_size
    assert full > 1_000_000, full
    broker.clock.advance(601)
    assert await _wait_for(lambda: _flows(broker) == 0)
    # No checkpoint of our own here: the purge's checkpoint must truncate the file, even when
    # the purge races the broker's own readers.
    assert await _wait_for(lambda: path.stat().st_size < full / 4)
    print(f"SQLite file with 4000 flows: {full} bytes; after the purge: {path.stat().st_size} bytes")
    assert (await broker.resolve("alice")).access_token


def _checkpoint(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()


def test_reclaim_truncates_the_file_even_when_a_reader_holds_an_older_snapshot(tmp_path: Path) -> None:
    """A reader that began before the vacuum (the event hub's poll, another process) stops a
    checkpoint short of the end of the WAL, and the file then keeps its size. The reclaim tries
    again once the reader is gone, so the space still comes back now."""
    path = tmp_path / "broker.db"
    store = SqliteStore(path)
    try:
        for i in range(4000):
            store.add_pending_flow(
                PendingFlowRow(f"{i:064x}", f"u{i}", "k", 1.0, 2.0, "kid", b"x" * 300), 5, 1.0
            )
        _checkpoint(path)
        full = path.stat().st_size
        assert full > 1_000_000, full
        reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM pending_flows").fetchone()  # a snapshot from before
        assert store.purge_expired_flows(3.0) == 4000
        releaser = threading.Timer(0.3, reader.rollback)
        releaser.start()
        try:
            store.reclaim_space()
        finally:
            releaser.join()
            reader.close()
        assert path.stat().st_size < full / 4, (full, path.stat().st_size)
    finally:
        store.close()


def test_existing_sqlite_store_is_converted_to_incremental_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    SqliteStore(path).close()
    conn = sqlite3.connect(path)  # make it look like a store written before the change
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    conn.execute(
        "INSERT INTO pending_flows (state_hash, user_id, upstream_key, created_at, expires_at, kek_id, sealed) "
        "VALUES ('h', 'u', 'k', 1.0, 2.0, 'kid', x'00')"
    )
    conn.commit()
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    store = SqliteStore(path)
    try:
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        finally:
            conn.close()
        assert store.take_pending_flow("h") is not None  # its rows are kept
    finally:
        store.close()


def test_cap_holds_under_concurrent_inserts_from_two_replicas(make_broker_stores: tuple[Any, Any]) -> None:
    """Two stores on one database (two processes or replicas) inserting at once never pass the cap."""
    a, b = make_broker_stores
    cap = 40

    def insert(store: Any, start: int) -> list[bool]:
        return [
            store.add_pending_flow(
                PendingFlowRow(f"{i:064x}", f"user-{i}", "k", 1.0, 1e12, "kid", b"x"), 5, 2.0, cap
            )
            for i in range(start, start + 50)
        ]

    with ThreadPoolExecutor(4) as pool:
        results = [
            r
            for future in [pool.submit(insert, s, n * 50) for n, s in enumerate((a, b, a, b))]
            for r in future.result()
        ]
    assert results.count(True) == cap and results.count(False) == 200 - cap
    assert a.purge_expired_flows(1e12 + 1) == cap  # every stored flow, and no more


def test_purge_once_counts_and_a_failing_purge_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(tmp_path / "b.db")
    clock = ManualClock(0.0)
    purger = FlowPurger(store, clock, 0.1)
    store.add_pending_flow(PendingFlowRow("a" * 64, "u", "k", 1.0, 2.0, "kid", b"x"), 5, 1.0)
    assert purger.purge_once() == 0  # not expired yet
    clock.advance(2.0)
    assert purger.purge_once() == 1 and purger.purged == 1
    store.close()
    with caplog.at_level("WARNING"):
        assert purger.purge_once() == 0  # the store is closed: logged, not raised
    assert "purging expired connect flows failed" in caplog.text
