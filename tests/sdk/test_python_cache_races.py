"""The cache's race rules, driven directly in the order a slow RPC and the watch stream can
interleave (the network paths around them are in test_python_cache.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from credential_broker_client import AsyncBrokerClient, BrokerClient
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2 as pb
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from credential_broker_client.cache import CredentialCache
from credential_broker_client.models import ConnectionEvent, Credential


def _credential(token: str) -> Credential:
    expires = datetime.now(UTC) + timedelta(hours=1)
    return Credential(token, "Bearer", "Authorization", f"Bearer {token}", expires, (), "connect", {})


def _event(kind: str, user: str) -> ConnectionEvent:
    return ConnectionEvent(1, user, "github", kind, "connected", "", None)


def test_an_eviction_does_not_revive_an_answer_an_event_made_stale() -> None:
    """A resolve in flight (its ticket taken) is overtaken by REFRESHED and a newer answer; the
    key is then evicted by other traffic. The slow answer must still be refused."""
    cache = CredentialCache(max_entries=1, settle_seconds=0)
    cache.set_live(True)
    alice, bob = ("alice", "github"), ("bob", "github")
    slow = cache.ticket(alice)  # R1 sent; the broker answers with the old token, slowly
    cache.apply(_event("REFRESHED", "alice"))
    assert cache.put(alice, _credential("new"), cache.ticket(alice))
    assert cache.put(bob, _credential("bob"), cache.ticket(bob))  # evicts alice
    assert not cache.put(alice, _credential("old"), slow)
    assert cache.get(alice, 0, ()) is None


class _OddBroker(pb_grpc.CredentialBrokerServicer):  # type: ignore[misc]
    """A WatchConnections that first sends an event the SDK cannot read (a timestamp beyond any
    date), then, on the next subscription, sends its headers and stays open."""

    def __init__(self) -> None:
        self.subscriptions = 0

    def WatchConnections(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.subscriptions += 1
        context.send_initial_metadata(())
        if self.subscriptions == 1:
            event = pb.ConnectionEvent(sequence=1, user_id="alice", upstream="github", kind=1)
            event.at.seconds = 10**15
            yield pb.WatchConnectionsResponse(event=event)
        while context.is_active():
            time.sleep(0.05)


@pytest.fixture
def odd_broker() -> Iterator[tuple[str, _OddBroker]]:
    servicer = _OddBroker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CredentialBrokerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_the_sync_cache_watch_outlives_an_event_it_cannot_read(odd_broker: tuple[str, _OddBroker]) -> None:
    address, servicer = odd_broker
    with BrokerClient(address, cache=True) as client:
        deadline = time.monotonic() + 10
        while not (client.wait_cache_live(0.1) and servicer.subscriptions >= 2):
            assert time.monotonic() < deadline, "the cache's watch died on the unreadable event"


async def test_the_async_cache_watch_outlives_an_event_it_cannot_read(
    odd_broker: tuple[str, _OddBroker],
) -> None:
    address, servicer = odd_broker
    async with AsyncBrokerClient(address, cache=True) as client:
        deadline = time.monotonic() + 10
        while not (await client.wait_cache_live(0.1) and servicer.subscriptions >= 2):
            assert time.monotonic() < deadline, "the cache's watch died on the unreadable event"
