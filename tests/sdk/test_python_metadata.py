"""The caller's own metadata through the Python SDK: ``outgoing_metadata`` sends pairs such as
``x-request-id`` (which the broker's audit trail records) with every call made inside it, from
the sync and the async client, per thread and per task, and never lets them replace the SDK's
own headers. Against a real broker on loopback gRPC."""

from __future__ import annotations

import asyncio
import threading

import pytest
from credential_broker_client import AsyncBrokerClient, BrokerClient, NotConnected, outgoing_metadata

from tests.conftest import UPSTREAM, Broker

from .conftest import target


def _request_ids(broker: Broker, user: str) -> list[str]:
    return [e.request_id for e in broker.extra["audit"].events if e.user == user]


async def test_the_request_id_reaches_the_audit_trail_from_the_sync_client(broker: Broker) -> None:
    def calls() -> None:
        with BrokerClient(target(broker)) as client:
            with outgoing_metadata(("x-request-id", "req-sync-1")), pytest.raises(NotConnected):
                client.resolve("meta-sync", UPSTREAM)
            with pytest.raises(NotConnected):  # outside the block: the broker makes one up
                client.resolve("meta-sync", UPSTREAM)

    await asyncio.to_thread(calls)
    ids = _request_ids(broker, "meta-sync")
    assert len(ids) == 2 and ids[0] == "req-sync-1" and ids[1] not in ("", "req-sync-1")


async def test_the_request_id_reaches_the_audit_trail_from_the_async_client(broker: Broker) -> None:
    async with AsyncBrokerClient(target(broker)) as client:

        async def one(n: int) -> None:
            with outgoing_metadata(("x-request-id", f"req-async-{n}")), pytest.raises(NotConnected):
                await client.resolve(f"meta-async-{n}", UPSTREAM)

        # Concurrent tasks: each call carries its own task's id, never another's.
        await asyncio.gather(*(one(n) for n in range(5)))
    for n in range(5):
        assert _request_ids(broker, f"meta-async-{n}") == [f"req-async-{n}"]


async def test_the_metadata_is_per_thread(broker: Broker) -> None:
    barrier = threading.Barrier(2)

    def call(client: BrokerClient, user: str, rid: str | None) -> None:
        barrier.wait()
        if rid is None:
            with pytest.raises(NotConnected):
                client.resolve(user, UPSTREAM)
            return
        with outgoing_metadata(("x-request-id", rid)), pytest.raises(NotConnected):
            client.resolve(user, UPSTREAM)

    def calls() -> None:
        with BrokerClient(target(broker)) as client:
            threads = [
                threading.Thread(target=call, args=(client, "meta-t1", "req-thread-1")),
                threading.Thread(target=call, args=(client, "meta-t2", None)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    await asyncio.to_thread(calls)
    assert _request_ids(broker, "meta-t1") == ["req-thread-1"]
    ids = _request_ids(broker, "meta-t2")
    assert len(ids) == 1 and ids != ["req-thread-1"]


def test_the_sdk_headers_cannot_be_replaced_or_doubled() -> None:
    for key in (
        "x-credential-broker-request",
        "x-credential-broker-caller-token",
        "authorization",
        "grpc-timeout",
        ":authority",
        "x-trace-bin",
        "X-Request-Id",
        "x request",
        "",
    ):
        with pytest.raises(ValueError, match="metadata") as caught, outgoing_metadata((key, "v")):
            pass
        assert "v'" not in str(caught.value)
    for value in ("two\nlines", "caf\u00e9", "x" * 9000):
        with (
            pytest.raises(ValueError, match="x-request-id") as caught,
            outgoing_metadata(("x-request-id", value)),
        ):
            pass
        assert value not in str(caught.value)  # a value may be a secret: never echoed


async def test_nested_blocks_add_up_and_unwind(broker: Broker) -> None:
    async with AsyncBrokerClient(target(broker)) as client:
        with outgoing_metadata(("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")):
            with outgoing_metadata(("x-request-id", "req-nested")), pytest.raises(NotConnected):
                await client.resolve("meta-nested", UPSTREAM)
            with pytest.raises(NotConnected):
                await client.resolve("meta-nested", UPSTREAM)
    ids = _request_ids(broker, "meta-nested")
    assert len(ids) == 2 and ids[0] == "req-nested" and ids[1] != "req-nested"
