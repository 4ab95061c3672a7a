"""DisconnectAll (offboarding): every connection of one user is revoked at its provider (RFC
7009) and deleted, reported per upstream, audited, and announced as DISCONNECTED events. The
provider's own introspection (RFC 7662) is the judge of whether the tokens are dead. A caller
with rules reaches only the upstreams it may use."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.callers import token_hash
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc

OTHER = "other"
HEADER = (("x-credential-broker-request", "true"),)


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _two_upstreams(
    make_broker: BrokerFactory, auth_server: AuthServer, other_auth_server: AuthServer, **settings: Any
) -> Broker:
    """A broker with UPSTREAM on one authorization server and OTHER on another, both with a
    revocation endpoint; the same client is registered with both."""
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    other_auth_server.add_client(client)
    first = upstream_doc(auth_server, client, revocation_endpoint=auth_server.revocation_endpoint)
    second = upstream_doc(
        other_auth_server, client, revocation_endpoint=other_auth_server.revocation_endpoint
    )
    second |= {"name": OTHER, "url": "https://other.test"}
    return await make_broker(client=client, upstreams=[first, second], **settings)


async def _connect(broker: Broker, auth: AuthServer, user: str, upstream: str) -> None:
    started = await broker.start_flow(user, upstream)
    callback = await asyncio.to_thread(auth.authorize, started.authorization_url, user)
    await broker.stub.Complete(pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user))


def _active(auth: AuthServer, broker: Broker, tokens: list[str]) -> list[bool]:
    return [bool(auth.introspect(broker.client, t)["active"]) for t in tokens]


async def test_disconnect_all_revokes_every_connection_at_the_provider(
    make_broker: BrokerFactory, auth_server: AuthServer, other_auth_server: AuthServer
) -> None:
    broker = await _two_upstreams(make_broker, auth_server, other_auth_server)
    for auth, upstream in ((auth_server, UPSTREAM), (other_auth_server, OTHER)):
        await _connect(broker, auth, "alice", upstream)
        await broker.resolve("alice", upstream)
    await _connect(broker, auth_server, "bob", UPSTREAM)  # another user: untouched
    alice = {UPSTREAM: auth_server.live_tokens("alice"), OTHER: other_auth_server.live_tokens("alice")}
    bob = auth_server.live_tokens("bob")
    assert all(len(tokens) == 2 for tokens in alice.values())  # an access and a refresh token each
    assert _active(auth_server, broker, alice[UPSTREAM]) == [True, True]
    assert _active(other_auth_server, broker, alice[OTHER]) == [True, True]
    since = broker.app.store.last_event_sequence()
    watch = broker.stub.WatchConnections(
        pb.WatchConnectionsRequest(user_id="alice", after_sequence=since), metadata=HEADER
    )

    answer = await broker.stub.DisconnectAll(pb.DisconnectAllRequest(user_id="alice"))

    by_upstream = {r.upstream: r for r in answer.results}
    assert sorted(by_upstream) == sorted([OTHER, UPSTREAM])
    for result in answer.results:
        assert result.deleted
        assert [(r.token_type_hint, r.outcome) for r in result.revocations] == [
            ("refresh_token", "revoked"),
            ("access_token", "revoked"),
        ]
    # The providers say so themselves.
    assert _active(auth_server, broker, alice[UPSTREAM]) == [False, False]
    assert _active(other_auth_server, broker, alice[OTHER]) == [False, False]
    assert _active(auth_server, broker, bob) == [True, True]
    for upstream in (UPSTREAM, OTHER):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await broker.resolve("alice", upstream)
        assert error_info(gone.value).reason == "NOT_CONNECTED"
    assert (await broker.resolve("bob")).access_token
    # One DISCONNECTED event per upstream.
    seen = []
    async for response in watch:
        seen.append(response.event)
        if len(seen) == 2:
            break
    watch.cancel()
    assert sorted(e.upstream for e in seen) == sorted([OTHER, UPSTREAM])
    assert {e.kind for e in seen} == {pb.ConnectionEventKind.CONNECTION_EVENT_KIND_DISCONNECTED}
    # Audited per upstream, with what happened to each token; never a token.
    records = [r for r in broker.extra["audit"].events if r.action == "disconnect" and r.upstream]
    assert sorted(r.upstream for r in records) == sorted([OTHER, UPSTREAM])
    assert all(r.user == "alice" and r.outcome == "success" for r in records)
    assert all(r.detail and r.detail["refresh_token"] == "revoked" for r in records)
    # Nothing left: a second call reports nothing and revokes nothing.
    revoked = len(auth_server.revoked)
    again = await broker.stub.DisconnectAll(pb.DisconnectAllRequest(user_id="alice"))
    assert list(again.results) == []
    assert len(auth_server.revoked) == revoked


async def test_disconnect_all_reaches_only_the_upstreams_the_caller_may_use(
    make_broker: BrokerFactory, auth_server: AuthServer, other_auth_server: AuthServer
) -> None:
    token, admin_token, reader_token = (os.urandom(24).hex() for _ in range(3))
    callers = [
        {"name": "reader", "token_sha256": token_hash(reader_token), "methods": ["ListConnections"]},
        {"name": "web", "token_sha256": token_hash(token), "upstreams": [UPSTREAM]},
        {"name": "admin", "token_sha256": token_hash(admin_token), "upstreams": ["*"]},
    ]
    broker = await _two_upstreams(make_broker, auth_server, other_auth_server, callers=callers)
    web = [("x-credential-broker-caller-token", token)]
    admin = [("x-credential-broker-caller-token", admin_token)]
    reader = [("x-credential-broker-caller-token", reader_token)]
    for auth, upstream in ((auth_server, UPSTREAM), (other_auth_server, OTHER)):
        started = await broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream=upstream), metadata=admin
        )
        callback = await asyncio.to_thread(auth.authorize, started.authorization_url, "alice")
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice"), metadata=admin
        )
    other_tokens = other_auth_server.live_tokens("alice")

    answer = await broker.stub.DisconnectAll(pb.DisconnectAllRequest(user_id="alice"), metadata=web)

    assert [(r.upstream, r.deleted) for r in answer.results] == [(UPSTREAM, True)]
    assert _active(other_auth_server, broker, other_tokens) == [True, True]
    assert len(broker.query("SELECT * FROM credentials WHERE user_id = 'alice'")) == 1
    # A caller whose methods do not include DisconnectAll is refused before anything happens.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.stub.DisconnectAll(pb.DisconnectAllRequest(user_id="alice"), metadata=reader)
    assert error_info(refused.value).reason == "CALLER_NOT_PERMITTED"
    assert _active(other_auth_server, broker, other_tokens) == [True, True]


async def test_disconnect_all_bad_input_is_refused_and_deletes_nothing(broker: Broker) -> None:
    await broker.connect("alice")
    for user in ("", "bad\nuser", "x" * 10_000):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await broker.stub.DisconnectAll(pb.DisconnectAllRequest(user_id=user))
        assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)
    assert len(broker.query("SELECT * FROM credentials")) == 1
    assert (await broker.resolve("alice")).access_token
