"""Resolve's read cache: this process's writes are seen at once, another's within the window."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, BrokerFactory, error_info


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


async def test_a_write_by_another_process_is_seen_within_the_window(make_broker: BrokerFactory) -> None:
    broker = await make_broker(read_cache_seconds=0.3)
    await broker.connect("alice")
    await broker.resolve("alice")
    other = broker.open_store()  # another process (or replica) deletes the row
    try:
        assert other.delete_credential("alice", broker.app.config.upstreams[0].key)
    finally:
        other.close()
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
