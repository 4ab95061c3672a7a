"""The connect flow through a real gRPC server and a real loopback authorization server."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


def _rows(broker: Broker, table: str = "credentials") -> int:
    return int(broker.query(f"SELECT COUNT(*) FROM {table}")[0][0])


async def test_authorization_url_carries_pkce_and_config(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(redirect_uri=REDIRECT_URI)
    endpoint = auth_server.authorization_endpoint + "?tenant=acme"
    broker = await make_broker(
        client=client,
        upstreams=[
            upstream_doc(
                auth_server, client, authorization_endpoint=endpoint, resource="https://api.gh.test/"
            )
        ],
    )
    started = await broker.start_flow()
    query = parse_qs(urlsplit(started.authorization_url).query)
    assert query["tenant"] == ["acme"]
    assert query["response_type"] == ["code"] and query["client_id"] == [client.client_id]
    assert query["redirect_uri"] == [REDIRECT_URI] and query["state"] == [started.state]
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["scope"] == ["repo read:user"] and query["resource"] == ["https://api.gh.test/"]
    assert abs(started.expires_at.seconds - (broker.clock.now() + 600)) <= 1
    # The state is stored only as a hash.
    assert started.state.encode() not in broker.db_bytes()


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "none"])
async def test_full_flow_then_resolve(make_broker: BrokerFactory, method: str) -> None:
    broker = await make_broker(auth_method=method)
    done = await broker.connect("alice")
    info = done.credential
    assert (info.user_id, info.upstream, info.obtained_via, info.token_type) == (
        "alice",
        UPSTREAM,
        "connect_flow",
        "Bearer",
    )
    assert list(info.scopes) == ["repo", "read:user"] and info.HasField("expires_at")
    resolved = await broker.resolve("alice")
    assert broker.auth.access_token_info(resolved.access_token)["user"] == "alice"
    assert (
        resolved.header_name == "Authorization" and resolved.header_value == f"Bearer {resolved.access_token}"
    )
    assert resolved.obtained_via == "connect_flow"
    (exchange,) = broker.auth.token_requests("authorization_code")
    assert exchange.form["redirect_uri"] == [REDIRECT_URI] and "code_verifier" in exchange.form
    assert not any(resolved.access_token in str(f) for f in info.ListFields())


async def test_complete_by_another_user_is_refused_and_consumes_the_flow(broker: Broker) -> None:
    started = await broker.start_flow("alice")
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="mallory")
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert callback["code"] not in info.value.details() and started.state not in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(again.value).reason == "FLOW_NOT_FOUND"
    assert _rows(broker) == 0 and broker.auth.token_requests() == []


async def test_unknown_reused_and_expired_states(broker: Broker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await broker.stub.Complete(pb.CompleteRequest(state="A" * 43, code="c", user_id="alice"))
    assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await broker.connect("alice")
    started = await broker.start_flow("alice")
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    broker.clock.advance(601)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
        )
    assert error_info(expired.value).reason == "FLOW_NOT_FOUND"


async def test_deny_clears_the_flow_and_stores_nothing(broker: Broker) -> None:
    started = await broker.start_flow("alice")
    await broker.stub.Deny(
        pb.DenyRequest(state=started.state, error="access_denied", error_description="user said no")
    )
    assert _rows(broker, "pending_flows") == 0 and _rows(broker) == 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(pb.CompleteRequest(state=started.state, code="x", user_id="alice"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Unknown state: still fine.
    await broker.stub.Deny(pb.DenyRequest(state="B" * 43, error="access_denied"))


@pytest.mark.parametrize(
    ("kind", "options", "code"),
    [
        ("500", {}, grpc.StatusCode.UNAVAILABLE),
        ("503", {}, grpc.StatusCode.UNAVAILABLE),
        ("junk", {}, grpc.StatusCode.UNAVAILABLE),
        ("huge", {}, grpc.StatusCode.UNAVAILABLE),
        ("gzip_bomb", {}, grpc.StatusCode.UNAVAILABLE),
        ("no_access_token", {}, grpc.StatusCode.UNAVAILABLE),
        ("wrong_types", {}, grpc.StatusCode.UNAVAILABLE),
        ("close", {}, grpc.StatusCode.UNAVAILABLE),
        ("timeout", {"seconds": 3}, grpc.StatusCode.UNAVAILABLE),
        ("oauth_error", {"error": "invalid_grant"}, grpc.StatusCode.FAILED_PRECONDITION),
        ("bad_error", {}, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_token_endpoint_failures_store_nothing_and_leak_nothing(
    make_broker: BrokerFactory, kind: str, options: dict[str, object], code: grpc.StatusCode
) -> None:
    broker = await make_broker(http={"timeout_seconds": 0.5})
    started = await broker.start_flow("alice")
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    broker.auth.fail_next(kind, **options)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
        )
    assert info.value.code() == code
    text = info.value.details() + repr(error_info(info.value))
    for secret in broker.auth.issued | {started.state, callback["code"]}:
        assert secret not in text
    assert "script" not in text and "127.0.0.1" not in text
    if kind == "oauth_error":
        assert error_info(info.value).metadata["oauth_error"] == "invalid_grant"
    assert _rows(broker) == 0
    # and the server keeps serving
    await broker.connect("alice")


async def test_pending_flow_survives_a_restart(make_broker: BrokerFactory) -> None:
    first = await make_broker()
    started = await first.start_flow("alice")
    callback = await asyncio.to_thread(first.auth.authorize, started.authorization_url, "alice")
    await first.channel.close()
    await first.app.stop(grace=0)
    second = await make_broker(client=first.client, clock=first.clock)
    done = await second.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
    )
    assert done.credential.user_id == "alice"


async def test_pending_flows_per_user_are_bounded(broker: Broker) -> None:
    for _ in range(12):
        await broker.start_flow("alice")
    await broker.start_flow("bob")
    assert _rows(broker, "pending_flows") == 6


async def test_no_token_reaches_the_database_file(broker: Broker) -> None:
    for user in ("alice", "bob"):
        await broker.connect(user)
    broker.clock.advance(3600)
    await broker.resolve("alice")  # refreshed: a rotated refresh token too
    raw = broker.db_bytes()
    assert len(broker.auth.issued) >= 6
    for secret in broker.auth.issued:
        assert secret.encode() not in raw
    assert b"alice" in raw
