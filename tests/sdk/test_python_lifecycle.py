"""The Python SDK's lifecycle under misuse and a struggling broker, against a small real gRPC
server on loopback: a client closed while its calls, retries and watches are running; a caller's
own cancellation; UNAVAILABLE retried for the whole deadline, not given up a backoff step early."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from credential_broker_client import AsyncBrokerClient, BrokerClient, BrokerError, Cancelled, Unavailable
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2 as pb
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc


class _StrugglingBroker(pb_grpc.CredentialBrokerServicer):  # type: ignore[misc]
    """Resolve answers UNAVAILABLE until ``down_until`` (monotonic), then takes ``slow`` seconds
    to answer; WatchConnections sends its headers and stays open."""

    def __init__(self) -> None:
        self.down_until = 0.0
        self.slow = 0.0
        self.resolves = 0

    def Resolve(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.resolves += 1
        if time.monotonic() < self.down_until:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        deadline = time.monotonic() + self.slow
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        return pb.ResolveResponse(
            access_token="t0k3n", header_name="Authorization", header_value="Bearer t0k3n"
        )

    def WatchConnections(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.send_initial_metadata(())
        while context.is_active():
            time.sleep(0.02)
        yield from ()


@pytest.fixture
def struggling() -> Iterator[tuple[str, _StrugglingBroker]]:
    servicer = _StrugglingBroker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_CredentialBrokerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


# -- closing a client under its callers -----------------------------------------------------------


async def test_closing_the_async_client_fails_its_calls_in_flight_with_a_typed_error(
    struggling: tuple[str, _StrugglingBroker],
) -> None:
    """A resolve waiting on a slow broker when another task closes the client ends with the SDK's
    Cancelled error, not asyncio.CancelledError: its task was never cancelled (a TaskGroup or
    gather would otherwise take it for a cancellation and lose the failure)."""
    address, broker = struggling
    broker.slow = 5.0
    client = AsyncBrokerClient(address)
    call = asyncio.ensure_future(client.resolve("alice", "github", timeout=10))
    while broker.resolves == 0:
        await asyncio.sleep(0.01)
    await client.close()
    with pytest.raises(Cancelled):
        await call
    assert not call.cancelled()


async def test_closing_the_async_client_ends_its_watch_iterators(
    struggling: tuple[str, _StrugglingBroker],
) -> None:
    """As BrokerClient.watch does: the iterator simply ends when its client is closed."""
    address, _ = struggling
    client = AsyncBrokerClient(address)
    seen: list[Any] = []

    async def follow() -> None:
        async for event in client.watch():
            seen.append(event)

    following = asyncio.ensure_future(follow())
    await asyncio.sleep(0.3)
    await client.close()
    await asyncio.wait_for(following, 5)
    assert not following.cancelled() and seen == []


async def test_closing_the_async_client_during_a_retry_backoff_raises_a_typed_error(
    struggling: tuple[str, _StrugglingBroker],
) -> None:
    address, broker = struggling
    broker.down_until = time.monotonic() + 60
    client = AsyncBrokerClient(address)
    call = asyncio.ensure_future(client.resolve("alice", "github", timeout=30))
    while broker.resolves < 3:
        await asyncio.sleep(0.01)
    await client.close()
    with pytest.raises(BrokerError) as closed:
        await asyncio.wait_for(call, 5)
    assert isinstance(closed.value, (Cancelled, Unavailable))
    with pytest.raises(Cancelled):  # and any later call on the closed client
        await client.resolve("alice", "github")


def test_closing_the_sync_client_during_a_retry_backoff_raises_a_typed_error(
    struggling: tuple[str, _StrugglingBroker],
) -> None:
    """A thread retrying UNAVAILABLE when another thread closes the shared client gets a
    BrokerError (not grpc's ValueError about a closed channel), and gets it at once."""
    address, broker = struggling
    broker.down_until = time.monotonic() + 60
    client = BrokerClient(address)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.resolve("alice", "github", timeout=30)
        except BaseException as exc:  # the outcome is the test's subject
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    while broker.resolves < 5:  # well into the backoff: its pauses reach hundreds of ms
        time.sleep(0.01)
    client.close()
    closed_at = time.monotonic()
    thread.join(10)
    assert time.monotonic() - closed_at < 0.2, "the retry slept on after close"
    [error] = outcome
    assert isinstance(error, BrokerError), repr(error)
    with pytest.raises(Cancelled):
        client.resolve("alice", "github")
    with pytest.raises(Cancelled):
        next(iter(client.watch()))


async def test_the_callers_own_cancellation_still_propagates(
    struggling: tuple[str, _StrugglingBroker],
) -> None:
    """Cancelling a task in a slow call or in a retry backoff cancels it (nothing is swallowed
    or turned into an error), and the client stays usable."""
    address, broker = struggling
    async with AsyncBrokerClient(address) as client:
        broker.slow = 5.0
        slow = asyncio.ensure_future(client.resolve("alice", "github"))
        await asyncio.sleep(0.3)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        broker.slow, broker.down_until = 0.0, time.monotonic() + 60
        retrying = asyncio.ensure_future(client.resolve("alice", "github"))
        await asyncio.sleep(0.3)
        retrying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await retrying
        broker.down_until = 0.0
        assert (await client.resolve("alice", "github")).access_token == "t0k3n"


async def test_closing_the_async_client_keeps_the_closers_cancellation(
    struggling: tuple[str, _StrugglingBroker],
) -> None:
    """A task cancelled while close() waits for the watch stream to stop stays cancelled."""
    address, _ = struggling
    client = AsyncBrokerClient(address, cache=True)
    assert await client.wait_cache_live()
    closing = asyncio.ensure_future(client.close())
    await asyncio.sleep(0)  # close() has cancelled the watch task and waits for it
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert closing.cancelled()
    await client.close()  # closing again is harmless


# -- the deadline ---------------------------------------------------------------------------------


def _always_down_timing(address: str, broker: _StrugglingBroker, timeout: float) -> float:
    broker.down_until = time.monotonic() + 3600
    with BrokerClient(address) as client:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            client.resolve("alice", "github", timeout=timeout)
        return time.monotonic() - start


@pytest.mark.timeout(60)
def test_unavailable_is_retried_until_the_deadline_not_a_backoff_step_before(
    struggling: tuple[str, _StrugglingBroker],
) -> None:
    """A backoff step longer than what is left of the deadline is cut short for one last try:
    the call gives up at its deadline, and an outage shorter than the deadline is ridden out
    (it used to give up as much as a whole step, up to 1 s, early)."""
    address, broker = struggling
    gave_up = [_always_down_timing(address, broker, 1.5) for _ in range(3)]
    assert all(1.35 <= t <= 1.7 for t in gave_up), gave_up
    with BrokerClient(address) as client:
        for _ in range(3):
            broker.down_until = time.monotonic() + 1.2
            assert client.resolve("alice", "github", timeout=2.0).access_token == "t0k3n"


@pytest.mark.timeout(60)
async def test_the_async_client_retries_until_the_deadline_not_a_backoff_step_before(
    struggling: tuple[str, _StrugglingBroker],
) -> None:
    address, broker = struggling
    async with AsyncBrokerClient(address) as client:
        for _ in range(3):
            broker.down_until = time.monotonic() + 3600
            start = time.monotonic()
            with pytest.raises(Unavailable):
                await client.resolve("alice", "github", timeout=1.5)
            assert 1.35 <= time.monotonic() - start <= 1.7
        for _ in range(3):
            broker.down_until = time.monotonic() + 1.2
            assert (await client.resolve("alice", "github", timeout=2.0)).access_token == "t0k3n"


# -- a long outage --------------------------------------------------------------------------------


class _LongOutage(pb_grpc.CredentialBrokerServicer):  # type: ignore[misc]
    """Refuses (UNAVAILABLE) the first ``refusals`` calls of each method, then serves."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.resolves = 0
        self.watches = 0

    def Resolve(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.resolves += 1
        if self.resolves <= self.refusals:
            context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
        return pb.ResolveResponse(
            access_token="t0k3n", header_name="Authorization", header_value="Bearer t0k3n"
        )

    def WatchConnections(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.watches += 1
        if self.watches <= self.refusals:
            context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
        context.send_initial_metadata(())
        while context.is_active():
            time.sleep(0.02)
        yield from ()


@pytest.fixture
def long_outage(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, _LongOutage]]:
    """More than a thousand refusals in a row: ten minutes or so of a broker down at the real
    backoff cap (1 s), compressed by a cap of half a millisecond."""
    from credential_broker_client import _common

    monkeypatch.setattr(_common, "BACKOFF_CAP", 0.0005)
    servicer = _LongOutage(refusals=1100)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CredentialBrokerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.mark.timeout(120)
def test_a_call_retries_through_more_than_a_thousand_refusals(long_outage: tuple[str, _LongOutage]) -> None:
    """The retry count grows without bound within a long deadline; its backoff must not
    overflow (2**1024 is no float) and kill the call with an OverflowError."""
    address, broker = long_outage
    with BrokerClient(address) as client:
        assert client.resolve("alice", "github", timeout=90).access_token == "t0k3n"
    assert broker.resolves == broker.refusals + 1


@pytest.mark.timeout(120)
async def test_an_async_call_retries_through_more_than_a_thousand_refusals(
    long_outage: tuple[str, _LongOutage],
) -> None:
    address, broker = long_outage
    async with AsyncBrokerClient(address) as client:
        assert (await client.resolve("alice", "github", timeout=90)).access_token == "t0k3n"
    assert broker.resolves == broker.refusals + 1


@pytest.mark.timeout(120)
def test_the_cache_watch_resubscribes_after_more_than_a_thousand_refusals(
    long_outage: tuple[str, _LongOutage],
) -> None:
    """The cache's watch thread outlives a long outage: it comes up when the broker does
    (it used to die of an OverflowError, leaving the cache off for the client's lifetime)."""
    address, broker = long_outage
    with BrokerClient(address, cache=True) as client:
        assert client.wait_cache_live(timeout=90), f"the watch gave up after {broker.watches} tries"


@pytest.mark.timeout(120)
async def test_the_async_cache_watch_resubscribes_after_more_than_a_thousand_refusals(
    long_outage: tuple[str, _LongOutage],
) -> None:
    address, broker = long_outage
    async with AsyncBrokerClient(address, cache=True) as client:
        assert await client.wait_cache_live(timeout=90), f"the watch gave up after {broker.watches} tries"
