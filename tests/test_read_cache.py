"""Resolve's read cache: this process's writes are seen at once, another's within the window;
and while this process follows the connection events, another's change is seen as soon as its
event is read, so a cached credential need not be read again every window."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from broker import events, vault
from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


async def test_a_write_by_another_process_is_seen_within_the_window(make_broker: BrokerFactory) -> None:
    broker = await make_broker(read_cache_seconds=0.3)
    await broker.connect("alice")
    await broker.resolve("alice")
    assert broker.app.events is not None
    await broker.app.events.stop()  # events not followed (a lost store connection, say)
    _disconnect_elsewhere(broker, "alice")
    await asyncio.sleep(0.35)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert error_info(info.value).reason == "NOT_CONNECTED"


async def test_this_processes_writes_are_seen_at_once(make_broker: BrokerFactory) -> None:
    broker = await make_broker(read_cache_seconds=60)
    await broker.connect("alice")
    first = await broker.resolve("alice")
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    renewed = await broker.resolve("alice")
    assert renewed.access_token != first.access_token
    await broker.stub.Disconnect(pb.DisconnectRequest(user_id="alice", upstream=UPSTREAM))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert error_info(info.value).reason == "NOT_CONNECTED"
    await broker.connect("alice")  # and a new connection is served at once too
    assert (await broker.resolve("alice")).access_token not in (first.access_token, renewed.access_token)


async def test_a_remembered_read_never_crosses_users(make_broker: BrokerFactory) -> None:
    broker = await make_broker(read_cache_seconds=60)
    await broker.connect("alice")
    await broker.connect("bob")
    for _ in range(3):
        alice, bob = await broker.resolve("alice"), await broker.resolve("bob")
        assert broker.auth.access_token_info(alice.access_token)["user"] == "alice"
        assert broker.auth.access_token_info(bob.access_token)["user"] == "bob"


def _disconnect_elsewhere(broker: Broker, user: str, *, announced: bool = True) -> None:
    """Another process (or replica) deletes the user's credential; ``announced``: with its
    DISCONNECTED event in the same transaction, as a Disconnect does."""
    key = broker.app.config.upstreams[0].key
    other = broker.open_store()
    try:
        event = events.disconnected(user, key, time.time()) if announced else None
        assert other.delete_credential(user, key, event)
    finally:
        other.close()


def _credential_reads(broker: Broker) -> float:
    assert broker.app.metrics is not None
    value = broker.app.metrics.registry.get_sample_value(
        "credential_broker_store_operation_seconds_count", {"operation": "get_credential"}
    )
    return value or 0.0


async def _until_not_connected(broker: Broker, user: str, within: float) -> float:
    """Resolve until the answer is NOT_CONNECTED; the seconds that took."""
    started = time.monotonic()
    while True:
        try:
            await broker.resolve(user)
        except grpc.aio.AioRpcError as exc:
            assert error_info(exc).reason == "NOT_CONNECTED"
            return time.monotonic() - started
        assert time.monotonic() - started < within, "another process's change was not seen"
        await asyncio.sleep(0.01)


async def test_a_change_another_process_announces_is_seen_long_before_the_window_ends(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(read_cache_seconds=30)
    await broker.connect("alice")
    await broker.resolve("alice")
    _disconnect_elsewhere(broker, "alice")
    await _until_not_connected(broker, "alice", within=3)


async def test_while_events_are_followed_a_cached_credential_is_not_read_every_window(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(read_cache_seconds=1)
    await broker.connect("alice")
    await broker.events_read()
    await broker.resolve("alice")
    reads = _credential_reads(broker)
    until = time.monotonic() + 2.5  # two and a half windows
    while time.monotonic() < until:
        await broker.resolve("alice")
        await asyncio.sleep(0.02)
    assert _credential_reads(broker) == reads


async def test_a_change_without_an_event_is_seen_within_the_longest_followed_age(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only bookkeeping writes carry no event (a lease, a backoff, a key rewrap, another
    # process's exchanged token); a remembered read is still dropped at this age.
    monkeypatch.setattr(vault, "FOLLOWED_READ_SECONDS", 2.5)
    broker = await make_broker(read_cache_seconds=1)
    await broker.connect("alice")
    await broker.events_read()
    await broker.resolve("alice")
    _disconnect_elsewhere(broker, "alice", announced=False)
    assert await _until_not_connected(broker, "alice", within=6) > 1  # past the window
