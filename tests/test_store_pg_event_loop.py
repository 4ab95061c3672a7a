"""A PostgreSQL read that waits never stalls the broker: Resolve's store read (a read-cache
miss) and the reads of the refresh path go to a worker thread on PostgreSQL, so while one of
them waits on a lock (an operator's VACUUM FULL, REINDEX or a migration's ALTER TABLE holds
the credentials table) every other call, the health check among them, is still answered.
SQLite reads stay inline: they are local and never wait on a lock in WAL mode."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info

HOLD_SECONDS = 2.5


@pytest.fixture
def store_backend() -> str:
    return "postgres"


@contextmanager
def _table_locked(dsn: str) -> Iterator[None]:
    """Another session holds ACCESS EXCLUSIVE on the credentials table for HOLD_SECONDS."""
    locked = threading.Event()

    def hold() -> None:
        with psycopg.connect(dsn) as conn:
            conn.execute("LOCK TABLE credentials IN ACCESS EXCLUSIVE MODE")
            locked.set()
            time.sleep(HOLD_SECONDS)
            conn.rollback()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert locked.wait(10)
    try:
        yield
    finally:
        holder.join(HOLD_SECONDS + 10)


class _Checker:
    """Times a health Check sent from another thread on a channel of its own: the broker runs in
    this test's event loop, so a stalled loop would stall the test's own awaits too."""

    def __init__(self, broker: Broker) -> None:
        self._channel = grpc.insecure_channel(broker.app.server.addresses[0])
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def connect(self) -> None:
        self._health.Check(health_pb2.HealthCheckRequest(), timeout=10)

    def seconds(self) -> float:
        time.sleep(0.3)  # the other call is waiting on the lock by now
        started = time.monotonic()
        answer = self._health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        return time.monotonic() - started

    def close(self) -> None:
        self._channel.close()


async def test_a_resolve_waiting_on_a_locked_table_does_not_stall_the_server(
    make_broker: BrokerFactory, pg_dsn: str
) -> None:
    broker = await make_broker()
    checker = _Checker(broker)
    await asyncio.to_thread(checker.connect)
    with _table_locked(pg_dsn):
        checking = asyncio.ensure_future(asyncio.to_thread(checker.seconds))
        waiting = asyncio.ensure_future(broker.resolve("nobody"))  # a read-cache miss: it reads
        took = await checking
        assert took < 1.0, f"the health check waited {took:.2f} s behind a Resolve's store read"
    checker.close()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await waiting
    assert error_info(info.value).reason == "NOT_CONNECTED"  # it went on once the lock went


async def test_a_refresh_waiting_on_a_locked_table_does_not_stall_the_server(
    make_broker: BrokerFactory, pg_dsn: str
) -> None:
    broker = await make_broker()
    await broker.connect("alice")
    checker = _Checker(broker)
    await asyncio.to_thread(checker.connect)
    with _table_locked(pg_dsn):
        checking = asyncio.ensure_future(asyncio.to_thread(checker.seconds))
        waiting = asyncio.ensure_future(
            broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM), timeout=20)
        )
        took = await checking
        assert took < 1.0, f"the health check waited {took:.2f} s behind a Refresh's store read"
    checker.close()
    await waiting
