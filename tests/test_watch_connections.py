"""WatchConnections: connection events written with the change they describe and streamed to
watchers on every replica (PostgreSQL LISTEN/NOTIFY; a poll of the event table on SQLite), in
sequence order, each once, resumable with after_sequence, never carrying a token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from broker import events
from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.errors import StoreError, WatcherTooSlow
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info

K = pb.ConnectionEventKind
# The SSRF-guard header a real client sends over TCP (the test channels add it to unary calls).
HEADER = (("x-credential-broker-request", "true"),)


def _watch(broker: Broker, request: pb.WatchConnectionsRequest) -> _Stream:
    return _Stream(broker.stub.WatchConnections(request, metadata=HEADER))


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class _Stream:
    """A WatchConnections call read by a background task (cancelling a gRPC read cancels the
    call, so waits with a timeout are on this queue, never on the call)."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.events: asyncio.Queue[pb.ConnectionEvent | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                await self.events.put(response.event)
        finally:
            await self.events.put(None)

    async def take(self, count: int, timeout: float = 10.0) -> list[pb.ConnectionEvent]:
        out = []
        for _ in range(count):
            event = await asyncio.wait_for(self.events.get(), timeout)
            assert event is not None, "the stream ended"
            out.append(event)
        return out

    async def nothing_more(self, seconds: float = 0.6) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.events.get(), seconds)

    def cancel(self) -> None:
        self.call.cancel()
        self._task.cancel()


async def _lifecycle(broker: Broker, user: str = "alice") -> None:
    """CONNECTED, REFRESHED, NEEDS_REAUTH, DISCONNECTED, each through the RPCs."""
    await broker.connect(user)
    await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
    broker.auth.revoke_user(user)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
    assert error_info(refused.value).reason == "RECONNECT_REQUIRED"
    await broker.stub.Disconnect(pb.DisconnectRequest(user_id=user, upstream=UPSTREAM))


def _check_lifecycle(seen: list[pb.ConnectionEvent], user: str = "alice") -> None:
    assert [e.kind for e in seen] == [
        K.CONNECTION_EVENT_KIND_CONNECTED,
        K.CONNECTION_EVENT_KIND_REFRESHED,
        K.CONNECTION_EVENT_KIND_NEEDS_REAUTH,
        K.CONNECTION_EVENT_KIND_DISCONNECTED,
    ]
    assert [e.status for e in seen] == ["connected", "connected", "needs_reauth", "not_connected"]
    assert seen[2].last_error == "invalid_grant"
    assert all(e.user_id == user and e.upstream == UPSTREAM for e in seen)
    sequences = [e.sequence for e in seen]
    assert sequences == list(range(sequences[0], sequences[0] + 4))  # increasing, no gaps
    assert all(e.at.seconds > 0 for e in seen)


def _no_secret_in(seen: list[pb.ConnectionEvent], broker: Broker) -> None:
    blob = b"".join(e.SerializeToString() for e in seen)
    secrets = [s for s in broker.auth.issued if len(s) >= 8]
    assert secrets  # the server did issue tokens: the check below can fail
    assert not [s for s in secrets if s.encode() in blob]


async def _until_watching(broker: Broker, count: int = 1) -> None:
    hub = broker.app.events
    assert hub is not None
    deadline = time.monotonic() + 5
    while hub.watchers < count:
        assert time.monotonic() < deadline, "the watcher did not subscribe"
        await asyncio.sleep(0.01)


async def test_a_watcher_sees_the_lifecycle_in_order_with_increasing_sequences(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker()
    stream = _watch(broker, pb.WatchConnectionsRequest(user_id="alice"))
    await _until_watching(broker)  # live only (no after_sequence): subscribed before the changes
    await _lifecycle(broker)
    seen = await stream.take(4)
    _check_lifecycle(seen)
    _no_secret_in(seen, broker)
    await stream.nothing_more()
    stream.cancel()


async def test_resume_with_after_sequence_replays_the_rest_and_nothing_twice(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker()
    await broker.connect("alice")
    await broker.connect("bob")  # another user's event: not for alice's watcher
    for _ in range(2):
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    everything = _watch(broker, pb.WatchConnectionsRequest(after_sequence=0))
    first = await everything.take(4)
    assert [e.user_id for e in first] == ["alice", "bob", "alice", "alice"]
    everything.cancel()
    resumed = _watch(broker, pb.WatchConnectionsRequest(user_id="alice", after_sequence=first[2].sequence))
    (rest,) = await resumed.take(1)
    assert rest.sequence == first[3].sequence and rest.kind == K.CONNECTION_EVENT_KIND_REFRESHED
    await resumed.nothing_more()
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    (live,) = await resumed.take(1)
    assert live.sequence > rest.sequence
    await resumed.nothing_more()
    resumed.cancel()


async def test_a_watcher_on_replica_b_sees_the_changes_made_through_replica_a(
    make_broker: BrokerFactory,
) -> None:
    a = await make_broker()
    b = await make_broker(client=a.client, upstreams=a.document["upstreams"])
    stream = _watch(b, pb.WatchConnectionsRequest(user_id="alice", upstreams=[UPSTREAM]))
    await _until_watching(b)
    await _lifecycle(a)
    seen = await stream.take(4)
    _check_lifecycle(seen)
    _no_secret_in(seen, a)
    await stream.nothing_more()
    stream.cancel()
    # Restarting the watch after the last sequence it saw misses nothing and repeats nothing.
    await a.connect("alice")
    again = _watch(b, pb.WatchConnectionsRequest(user_id="alice", after_sequence=seen[-1].sequence))
    (reconnected,) = await again.take(1)
    assert reconnected.kind == K.CONNECTION_EVENT_KIND_CONNECTED
    assert reconnected.sequence == seen[-1].sequence + 1
    again.cancel()


async def test_bad_watch_requests_are_refused_before_streaming(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    with pytest.raises(grpc.aio.AioRpcError) as unguarded:  # the caller checks apply to streams
        async for _ in broker.stub.WatchConnections(pb.WatchConnectionsRequest(user_id="alice")):
            pass
    assert error_info(unguarded.value).reason == "MISSING_REQUEST_HEADER"
    for request, code in [
        (pb.WatchConnectionsRequest(upstreams=["nope"]), grpc.StatusCode.NOT_FOUND),
        (pb.WatchConnectionsRequest(user_id="bad\nuser"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in broker.stub.WatchConnections(request, metadata=HEADER):
                pass
        assert refused.value.code() == code


async def test_a_watcher_that_falls_behind_is_cut_off(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "WATCHER_QUEUE", 2)
    broker = await make_broker()
    hub = broker.app.events
    assert hub is not None
    key = broker.app.config.upstreams[0].key
    watch: AsyncIterator[events.ConnectionEvent] = hub.watch(None, {key}, None)
    first = asyncio.ensure_future(anext(watch))  # subscribed; then it stops reading
    await _until_watching(broker)
    for user in ("u1", "u2", "u3", "u4"):
        await broker.connect(user)
    newest = broker.app.store.last_event_sequence()
    # The hub has handed out every event, or cut the watcher off on the way (then, watched by
    # nobody, it reads no further events): the watcher read one meanwhile.
    while hub.position < newest and hub.watchers:
        await asyncio.sleep(0.01)
    delivered = [await first]
    deadline = time.monotonic() + 5
    while True:
        try:
            delivered.append(await asyncio.wait_for(anext(watch), 5))
        except WatcherTooSlow:
            break
        assert time.monotonic() < deadline
    assert 2 <= len(delivered) < 4  # the bounded queue, then cut off (not every event)
    assert [e.user_id for e in delivered] == ["u1", "u2", "u3"][: len(delivered)]
    assert hub.watchers == 0


def _event_reads(broker: Broker) -> float:
    """How many times this broker read connection events from the store (its store metrics)."""
    assert broker.app.metrics is not None
    value = broker.app.metrics.registry.get_sample_value(
        "credential_broker_store_operation_seconds_count", {"operation": "events_after"}
    )
    return value or 0.0


async def test_without_watchers_no_event_is_read_and_a_new_watcher_sees_only_new_ones(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker(read_cache_seconds=0)  # a read cache follows events (test_read_cache.py)
    hub = broker.app.events
    assert hub is not None
    for user in ("u1", "u2", "u3"):
        await broker.connect(user)  # events written (and the hub woken) with nobody watching
    await asyncio.sleep(0.5)  # several polls of the event table
    assert _event_reads(broker) == 0
    key = broker.app.config.upstreams[0].key
    watch: AsyncIterator[events.ConnectionEvent] = hub.watch(None, {key}, None)
    first = asyncio.ensure_future(anext(watch))
    await _until_watching(broker)
    await broker.connect("u4")
    event = await asyncio.wait_for(first, 5)
    assert (event.user_id, event.kind) == ("u4", events.EventKind.CONNECTED)  # not u1..u3's
    assert _event_reads(broker) > 0
    await watch.aclose()


async def test_the_stream_says_it_is_live_only_once_it_is_subscribed_even_on_a_slow_store(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client cache trusts its stream from the response headers on: every change committed
    after them must reach it, however slowly the store answers the hub's catch-up read."""
    broker = await make_broker(read_cache_seconds=0)  # nobody follows the events before the watch
    hub = broker.app.events
    assert hub is not None
    newest = hub._store.last_event_sequence

    def slow_newest() -> int:
        time.sleep(0.5)
        return newest()

    monkeypatch.setattr(hub._store, "last_event_sequence", slow_newest)
    deadline = time.monotonic() + 5
    while not hub._behind:  # unwatched, the hub stops reading: a watch must catch up first
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    stream = _watch(broker, pb.WatchConnectionsRequest())
    await asyncio.wait_for(stream.call.initial_metadata(), 10)  # live, as the SDKs take it
    await broker.connect("u1")
    [event] = await stream.take(1, timeout=5)
    assert (event.user_id, event.kind) == ("u1", K.CONNECTION_EVENT_KIND_CONNECTED)
    stream.cancel()


async def test_watchers_are_cut_off_when_the_events_cannot_be_read(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher the hub can no longer feed must not look healthy: a client cache would keep
    serving tokens that other replicas changed. Its stream ends UNAVAILABLE; resuming with
    after_sequence once the store answers again loses nothing."""
    broker = await make_broker()
    hub = broker.app.events
    assert hub is not None
    stream = _watch(broker, pb.WatchConnectionsRequest())
    await asyncio.wait_for(stream.call.initial_metadata(), 10)
    await broker.connect("u1")
    [first] = await stream.take(1)
    read = hub._store.events_after

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("the database is unreachable: secret-dsn-text")

    monkeypatch.setattr(hub._store, "events_after", failing)
    await broker.connect("u2")
    assert await asyncio.wait_for(stream.events.get(), 5) is None, "the stream stayed open"
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stream._task  # the reader's error: the call's
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(ended.value).reason == "STORE_UNAVAILABLE"
    assert "secret-dsn-text" not in str(ended.value.details())
    assert hub.watchers == 0
    monkeypatch.setattr(hub._store, "events_after", read)
    resumed = _watch(broker, pb.WatchConnectionsRequest(after_sequence=first.sequence))
    [event] = await resumed.take(1)
    assert (event.user_id, event.kind) == ("u2", K.CONNECTION_EVENT_KIND_CONNECTED)
    resumed.cancel()
