"""Refresh and Resolve: windows, rotation, reconnect, single flight, no fallback."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


def _status(broker: Broker, user: str = "alice") -> str:
    return str(broker.query("SELECT status FROM credentials WHERE user_id=?", (user,))[0][0])


async def test_cached_credential_is_served_without_a_token_request(broker: Broker) -> None:
    await broker.connect("alice")
    before = len(broker.auth.token_requests())
    first = await broker.resolve("alice")
    broker.clock.advance(3600 - 61)
    second = await broker.resolve("alice")
    assert first.access_token == second.access_token
    assert len(broker.auth.token_requests()) == before


async def test_near_expiry_refreshes_first(broker: Broker) -> None:
    await broker.connect("alice")
    first = await broker.resolve("alice")
    broker.clock.advance(3600 - 59)
    second = await broker.resolve("alice")
    assert second.access_token != first.access_token
    assert broker.auth.access_token_info(second.access_token)["user"] == "alice"
    (refresh,) = broker.auth.token_requests("refresh_token")
    assert "scope" not in refresh.form  # RFC 6749 section 6: the original grant stands


async def test_min_valid_seconds_widens_the_window(broker: Broker) -> None:
    await broker.connect("alice")
    first = await broker.resolve("alice")
    broker.clock.advance(1800)
    same = await broker.resolve("alice", min_valid_seconds=1000)
    renewed = await broker.resolve("alice", min_valid_seconds=2000)
    assert same.access_token == first.access_token and renewed.access_token != first.access_token


async def test_refresh_rotates_and_keeps_when_not_rotated(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await make_broker()
    await broker.connect("alice")
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    first, second = broker.auth.token_requests("refresh_token")
    assert first.form["refresh_token"] != second.form["refresh_token"]  # rotated one was stored
    # A response without a refresh token keeps the stored one.
    auth_server.fail_next("no_refresh_token")
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    done = await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    third, fourth = broker.auth.token_requests("refresh_token")[2:]
    assert third.form["refresh_token"] == fourth.form["refresh_token"]
    assert done.credential.user_id == "alice" and done.credential.HasField("updated_at")


async def test_invalid_grant_marks_reconnect_and_keeps_the_row(broker: Broker) -> None:
    await broker.connect("alice")
    broker.auth.revoke_user("alice")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = error_info(info.value)
    assert detail.reason == "RECONNECT_REQUIRED" and detail.domain == "credentialbroker"
    assert detail.metadata["upstream"] == UPSTREAM
    assert detail.metadata["authorization_url"].startswith(broker.auth.authorization_endpoint)
    assert _status(broker) == "needs_reauth"
    with pytest.raises(grpc.aio.AioRpcError) as resolved:
        await broker.resolve("alice")
    assert error_info(resolved.value).reason == "RECONNECT_REQUIRED"
    # Reconnecting fixes it.
    await broker.connect("alice")
    assert (await broker.resolve("alice")).access_token


async def test_no_refresh_token_means_reconnect(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    auth_server.issue_refresh_token = False
    broker = await make_broker()
    await broker.connect("alice")
    assert (await broker.resolve("alice")).access_token
    broker.clock.advance(3600)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert error_info(info.value).reason == "RECONNECT_REQUIRED"


async def test_missing_expires_in_means_no_known_expiry(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    auth_server.access_ttl = None
    broker = await make_broker()
    done = await broker.connect("alice")
    assert not done.credential.HasField("expires_at")
    broker.clock.advance(10 * 365 * 86400)
    resolved = await broker.resolve("alice")
    assert not resolved.HasField("expires_at") and resolved.access_token


async def test_not_connected_error_carries_a_ready_url(broker: Broker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = error_info(info.value)
    assert detail.reason == "NOT_CONNECTED"
    url = detail.metadata["authorization_url"]
    assert "state=" not in info.value.details()
    callback = await asyncio.to_thread(broker.auth.authorize, url, "alice")
    from urllib.parse import parse_qs, urlsplit

    state = parse_qs(urlsplit(url).query)["state"][0]
    await broker.stub.Complete(pb.CompleteRequest(state=state, code=callback["code"], user_id="alice"))
    assert (await broker.resolve("alice")).access_token


async def test_users_never_get_each_others_credential(broker: Broker) -> None:
    await broker.connect("alice")
    await broker.connect("bob")
    alice, bob = await broker.resolve("alice"), await broker.resolve("bob")
    assert broker.auth.access_token_info(alice.access_token)["user"] == "alice"
    assert broker.auth.access_token_info(bob.access_token)["user"] == "bob"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("carol")
    assert error_info(info.value).reason == "NOT_CONNECTED"


async def test_unknown_upstream_missing_user_and_unimplemented_mode(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client()
    exchange = {
        "name": "exchange",
        "url": "https://x.test",
        "auth_broker": {
            "mode": "token_exchange",
            "token_endpoint": auth_server.token_endpoint,
            "client_id": client.client_id,
            "client_secret": client.client_secret,
        },
    }
    broker = await make_broker(client=client, upstreams=[upstream_doc(auth_server, client), exchange])
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await broker.resolve("alice", upstream="nope")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await broker.resolve("")
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as later:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="exchange"))
    assert later.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "token_exchange" in later.value.details()


async def test_concurrent_resolves_share_one_refresh(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(3600)
    broker.auth.fail_next("timeout", seconds=0.5)  # a slow answer, so every caller piles up
    results = await asyncio.gather(*(broker.resolve("alice") for _ in range(20)))
    assert len({r.access_token for r in results}) == 1
    assert len(broker.auth.token_requests("refresh_token")) == 1


async def test_one_callers_cancellation_does_not_fail_the_others(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(3600)
    broker.auth.fail_next("timeout", seconds=0.5)
    impatient = asyncio.ensure_future(
        broker.stub.Resolve(pb.ResolveRequest(user_id="alice", upstream=UPSTREAM), timeout=0.1)
    )
    patient = [asyncio.ensure_future(broker.resolve("alice")) for _ in range(5)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await impatient
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    results = await asyncio.gather(*patient)
    assert len({r.access_token for r in results}) == 1
    assert len(broker.auth.token_requests("refresh_token")) == 1


async def test_valid_token_served_while_the_server_is_down(broker: Broker) -> None:
    await broker.connect("alice")
    first = await broker.resolve("alice")
    broker.clock.advance(3600 - 30)  # inside the refresh window, still valid for 30 s
    broker.auth.fail_next("503")
    again = await broker.resolve("alice")
    assert again.access_token == first.access_token
    broker.auth.fail_next("503")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice", min_valid_seconds=120)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _status(broker) == "error"  # transient: kept, retried after a backoff, still served


async def test_custom_header(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    client = auth_server.new_client()
    broker = await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client, header="X-Api-Key", header_format="token {token}")],
    )
    await broker.connect("alice")
    resolved = await broker.resolve("alice")
    assert (resolved.header_name, resolved.header_value) == ("X-Api-Key", f"token {resolved.access_token}")
