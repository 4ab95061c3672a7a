"""Incremental scopes (issue 14): Resolve with ``required_scopes`` that the stored grant lacks
answers FAILED_PRECONDITION / INSUFFICIENT_SCOPE with ``missing_scopes`` and an authorization URL
asking for the union of granted and required scopes; completing that flow replaces the
credential and emits SCOPES_CHANGED. Through the real gRPC server and the loopback
authorization server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc

K = pb.ConnectionEventKind
HEADER = (("x-credential-broker-request", "true"),)
GRANTED = ["repo", "read:user"]  # the upstream's configured scopes (tests/conftest.upstream_doc)


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _scope_param(url: str) -> list[str]:
    (scope,) = parse_qs(urlsplit(url).query)["scope"]
    return scope.split(" ")


async def _refused(broker: Broker, **kw: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.resolve("alice", **kw)
    return refused.value


def _flows(broker: Broker) -> int:
    ((count,),) = broker.query("SELECT COUNT(*) FROM pending_flows")
    return int(count)


async def _next_event(call: Any, timeout: float = 10.0) -> pb.ConnectionEvent:
    response = await asyncio.wait_for(call.read(), timeout)
    assert response is not grpc.aio.EOF, "the stream ended"
    return response.event


async def test_insufficient_scope_then_the_incremental_flow_then_resolve_succeeds(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker()
    await broker.connect("alice")
    before = await broker.resolve("alice", required_scopes=["repo"])  # granted: served as usual
    assert list(before.scopes) == GRANTED

    seen = broker.app.store.last_event_sequence()  # the CONNECTED above and before
    watch = broker.stub.WatchConnections(
        pb.WatchConnectionsRequest(user_id="alice", after_sequence=seen), metadata=HEADER
    )

    refused = await _refused(broker, required_scopes=["repo", "admin:org", "gist"])
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(refused)
    assert info.reason == "INSUFFICIENT_SCOPE"
    assert info.metadata["missing_scopes"] == "admin:org gist"
    assert info.metadata["upstream"] == UPSTREAM
    url = info.metadata["authorization_url"]
    assert sorted(_scope_param(url)) == sorted([*GRANTED, "admin:org", "gist"])
    # An app that polls gets the same flow back (reused, not replaced).
    again = error_info(await _refused(broker, required_scopes=["gist", "admin:org"]))
    assert again.metadata["authorization_url"] == url
    assert _flows(broker) == 1

    # The user completes that flow at the authorization server.
    callback = await asyncio.to_thread(broker.auth.authorize, url, "alice")
    state = parse_qs(urlsplit(url).query)["state"][0]
    done = await broker.stub.Complete(pb.CompleteRequest(state=state, code=callback["code"], user_id="alice"))
    assert sorted(done.credential.scopes) == sorted([*GRANTED, "admin:org", "gist"])

    resolved = await broker.resolve("alice", required_scopes=["admin:org", "gist"])
    assert sorted(resolved.scopes) == sorted([*GRANTED, "admin:org", "gist"])
    granted = broker.auth.access_token_info(resolved.access_token)
    assert granted is not None and granted["user"] == "alice"
    assert set(granted["scope"].split()) == {*GRANTED, "admin:org", "gist"}
    assert resolved.access_token != before.access_token  # the credential was replaced

    event = await _next_event(watch)
    assert event.kind == K.CONNECTION_EVENT_KIND_SCOPES_CHANGED
    assert (event.user_id, event.upstream, event.status) == ("alice", UPSTREAM, "connected")
    watch.cancel()
    # The replaced grant's refresh token was rotated into the new credential: a refresh works.
    refreshed = await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert sorted(refreshed.credential.scopes) == sorted([*GRANTED, "admin:org", "gist"])


async def test_a_reconnect_with_the_same_scopes_is_connected_not_scopes_changed(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker()
    await broker.connect("alice")
    watch = broker.stub.WatchConnections(
        pb.WatchConnectionsRequest(user_id="alice", after_sequence=0), metadata=HEADER
    )
    first = await _next_event(watch)
    assert first.kind == K.CONNECTION_EVENT_KIND_CONNECTED
    await broker.connect("alice")
    second = await _next_event(watch)
    assert second.kind == K.CONNECTION_EVENT_KIND_CONNECTED
    watch.cancel()


async def test_not_connected_with_required_scopes_asks_for_them_too(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    info = error_info(await _refused(broker, required_scopes=["gist"]))
    assert info.reason == "NOT_CONNECTED"
    assert sorted(_scope_param(info.metadata["authorization_url"])) == sorted([*GRANTED, "gist"])
    # Without required scopes the configured ones only (another flow: the scopes differ).
    plain = error_info(await _refused(broker))
    assert sorted(_scope_param(plain.metadata["authorization_url"])) == sorted(GRANTED)


@pytest.mark.parametrize(
    "scopes",
    [
        [""],
        ["has space"],
        ['quote"'],
        ["back\\slash"],
        ["tab\t"],
        ["caf\u00e9"],
        ["x" * 257],
        [f"s{n}" for n in range(65)],
    ],
    ids=["empty", "space", "quote", "backslash", "control", "non-ascii", "too-long", "too-many"],
)
async def test_malformed_required_scopes_are_invalid_argument_and_store_nothing(
    make_broker: BrokerFactory, scopes: list[str]
) -> None:
    broker = await make_broker()
    await broker.connect("alice")
    refused = await _refused(broker, required_scopes=scopes)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "required_scopes" in (refused.details() or "")
    assert _flows(broker) == 0
    # The server keeps serving.
    assert (await broker.resolve("alice")).access_token


async def test_a_scope_holding_the_upstreams_separator_is_refused(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(redirect_uri=REDIRECT_URI)
    comma = await make_broker(
        client=client, upstreams=[upstream_doc(auth_server, client, scope_separator=",")]
    )
    refused = await _refused(comma, required_scopes=["a,b"])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "separator" in (refused.details() or "")


async def test_an_answer_without_scope_grants_what_the_flow_asked_for(make_broker: BrokerFactory) -> None:
    """RFC 6749 section 5.1: scope may be left out of the answer when it is what was asked."""
    broker = await make_broker()
    await broker.connect("alice")
    url = error_info(await _refused(broker, required_scopes=["gist"])).metadata["authorization_url"]
    callback = await asyncio.to_thread(broker.auth.authorize, url, "alice")
    broker.auth.fail_next("override", fields={"scope": None})
    state = parse_qs(urlsplit(url).query)["state"][0]
    done = await broker.stub.Complete(pb.CompleteRequest(state=state, code=callback["code"], user_id="alice"))
    assert sorted(done.credential.scopes) == sorted([*GRANTED, "gist"])
    assert "gist" in (await broker.resolve("alice", required_scopes=["gist"])).scopes
