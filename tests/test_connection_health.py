"""Connection health in ListConnections: refresh_token_expires_at (from the answer's
refresh_token_expires_in), last_refreshed_at, last_used_at (stamped by Resolve at most once a
minute per credential), consecutive_failures and next_retry_at. Real broker, real store (both
backends), the test authorization server; the clock is the only fake."""

from __future__ import annotations

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker, BrokerFactory


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _health(broker: Broker, user: str = "alice") -> pb.Connection:
    await broker.app.service.usage.drain()  # the stamp is written off the Resolve path
    answer = await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id=user))
    (found,) = [c for c in answer.connections if c.upstream == UPSTREAM]
    return found


def _at(connection: pb.Connection, field: str) -> float | None:
    if not connection.HasField(field):  # type: ignore[arg-type]
        return None
    stamp = getattr(connection, field)
    return float(stamp.seconds) + stamp.nanos / 1e9


async def test_health_fields_follow_connect_use_refresh_and_failure(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    clock = broker.clock
    broker.auth.fail_next("override", fields={"refresh_token_expires_in": 3600})
    connected_at = clock.now()
    await broker.connect("alice")
    fresh = await _health(broker)
    assert _at(fresh, "refresh_token_expires_at") == pytest.approx(connected_at + 3600, abs=0.01)
    assert _at(fresh, "last_refreshed_at") is None  # only the connect flow's token so far
    assert _at(fresh, "last_used_at") is None
    assert (fresh.consecutive_failures, _at(fresh, "next_retry_at")) == (0, None)

    # Resolve stamps last_used_at; again within a minute writes nothing; after a minute, again.
    clock.advance(5)
    used_at = clock.now()
    await broker.resolve("alice")
    assert _at(await _health(broker), "last_used_at") == pytest.approx(used_at, abs=0.01)
    for _ in range(20):
        clock.advance(2)
        await broker.resolve("alice")
    assert _at(await _health(broker), "last_used_at") == pytest.approx(used_at, abs=0.01)
    assert broker.app.service.usage.written == 1
    clock.advance(30)
    later = clock.now()
    await broker.resolve("alice")
    assert _at(await _health(broker), "last_used_at") == pytest.approx(later, abs=0.01)
    assert broker.app.service.usage.written == 2

    # A refresh with a new lifetime: last_refreshed_at moves, last_used_at survives the write.
    clock.advance(10)
    refreshed_at = clock.now()
    broker.auth.fail_next("override", fields={"refresh_token_expires_in": 7200})
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    after = await _health(broker)
    assert _at(after, "refresh_token_expires_at") == pytest.approx(refreshed_at + 7200, abs=0.01)
    assert _at(after, "last_refreshed_at") == pytest.approx(refreshed_at, abs=0.01)
    assert _at(after, "last_used_at") == pytest.approx(later, abs=0.01)

    # An answer that keeps the old refresh token keeps its expiry too.
    clock.advance(10)
    broker.auth.fail_next("no_refresh_token")
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    kept = await _health(broker)
    assert _at(kept, "refresh_token_expires_at") == pytest.approx(refreshed_at + 7200, abs=0.01)
    assert _at(kept, "last_refreshed_at") == pytest.approx(clock.now(), abs=0.01)

    # Two failed refreshes: counted, with the time of the next try.
    for _ in range(2):
        broker.auth.fail_next("503")
        with pytest.raises(grpc.aio.AioRpcError):
            await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
        clock.advance(400)  # past any backoff
    failing = await _health(broker)
    assert failing.consecutive_failures == 2
    retry = _at(failing, "next_retry_at")
    assert retry is not None and clock.now() - 400 < retry <= clock.now() - 400 + 300
    assert failing.last_error == "http_5xx"
    # A success clears both.
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    recovered = await _health(broker)
    assert (recovered.consecutive_failures, _at(recovered, "next_retry_at")) == (0, None)


async def test_a_new_refresh_token_without_a_lifetime_has_no_known_expiry(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    broker.auth.fail_next("override", fields={"refresh_token_expires_in": 3600})
    await broker.connect("alice")
    assert _at(await _health(broker), "refresh_token_expires_at") is not None
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))  # rotated, no lifetime
    assert _at(await _health(broker), "refresh_token_expires_at") is None
