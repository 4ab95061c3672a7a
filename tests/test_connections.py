"""ListConnections, Disconnect with RFC 7009 revocation, RFC 8414 discovery, RFC 9207 iss."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.errors import ConfigError
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc


async def _list(broker: Broker, user: str = "alice") -> dict[str, pb.Connection]:
    answer = await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id=user))
    return {c.upstream: c for c in answer.connections}


def _revocations(answer: pb.DisconnectResponse) -> list[tuple[str, str, str]]:
    return [(r.token_type_hint, r.outcome, r.reason) for r in answer.revocations]


async def _disconnect(broker: Broker, user: str = "alice") -> pb.DisconnectResponse:
    return await broker.stub.Disconnect(pb.DisconnectRequest(user_id=user, upstream=UPSTREAM))


async def test_list_connections_statuses_and_no_tokens(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    other = upstream_doc(auth_server, client) | {"name": "other", "url": "https://other.test"}
    broker = await make_broker(client=client, upstreams=[upstream_doc(auth_server, client), other])
    before = len(broker.auth.requests)
    listed = await _list(broker)
    assert {name: c.status for name, c in listed.items()} == {
        UPSTREAM: "not_connected",
        "other": "not_connected",
    }
    assert len(broker.auth.requests) == before  # listing mints no authorization URL
    await broker.connect("alice")
    resolved = await broker.resolve("alice")
    listed = await _list(broker)
    gh = listed[UPSTREAM]
    assert (gh.status, gh.mode, gh.obtained_via) == ("connected", "oauth_connect", "connect_flow")
    assert (
        list(gh.scopes) == ["repo", "read:user"] and gh.HasField("expires_at") and gh.HasField("updated_at")
    )
    assert listed["other"].status == "not_connected"
    assert (
        resolved.access_token.encode()
        not in (
            await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id="alice"))
        ).SerializeToString()
    )
    broker.clock.advance(3601)
    assert (await _list(broker))[UPSTREAM].status == "expired"
    broker.auth.revoke_user("alice")
    with pytest.raises(grpc.aio.AioRpcError):
        await broker.resolve("alice")
    gh = (await _list(broker))[UPSTREAM]
    assert (gh.status, gh.last_error) == ("needs_reauth", "invalid_grant")
    assert (await _list(broker, "bob"))[UPSTREAM].status == "not_connected"


async def test_disconnect_revokes_both_tokens_then_deletes(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    broker = await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client, revocation_endpoint=auth_server.revocation_endpoint)],
    )
    await broker.connect("alice")
    access = (await broker.resolve("alice")).access_token
    (code_grant,) = broker.auth.token_requests("authorization_code")
    assert broker.auth.access_token_info(access) is not None
    answer = await _disconnect(broker)
    assert answer.deleted
    assert _revocations(answer) == [("refresh_token", "revoked", ""), ("access_token", "revoked", "")]
    revoked = broker.auth.revoked
    assert [hint for _, hint in revoked] == ["refresh_token", "access_token"]
    assert revoked[1][0] == access
    assert not broker.auth.refresh_token_live(revoked[0][0])
    assert broker.auth.access_token_info(access) is None
    assert (await _list(broker))[UPSTREAM].status == "not_connected"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert error_info(info.value).reason == "NOT_CONNECTED"
    # Nothing left to revoke the second time.
    again = await _disconnect(broker)
    assert not again.deleted
    assert _revocations(again) == [("refresh_token", "absent", ""), ("access_token", "absent", "")]
    assert code_grant.form["code"]  # (the flow really ran through the server)


@pytest.mark.parametrize("failure", ["503", "500"])
async def test_disconnect_deletes_even_when_revocation_fails(
    make_broker: BrokerFactory, auth_server: AuthServer, failure: str
) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    broker = await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client, revocation_endpoint=auth_server.revocation_endpoint)],
    )
    await broker.connect("alice")
    access = (await broker.resolve("alice")).access_token
    auth_server.fail_revocation = failure
    answer = await _disconnect(broker)
    assert answer.deleted
    assert _revocations(answer) == [
        ("refresh_token", "failed", f"http_{failure}"),
        ("access_token", "failed", f"http_{failure}"),
    ]
    assert broker.auth.access_token_info(access) is not None  # really not revoked, and we say so
    assert (await _list(broker))[UPSTREAM].status == "not_connected"
    auth_server.fail_revocation = None


async def test_disconnect_without_an_endpoint_or_a_reachable_server(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await make_broker()  # no revocation_endpoint, no issuer
    await broker.connect("alice")
    answer = await _disconnect(broker)
    assert answer.deleted
    assert _revocations(answer) == [
        ("refresh_token", "not_supported", "no_revocation_endpoint"),
        ("access_token", "not_supported", "no_revocation_endpoint"),
    ]
    assert broker.auth.revoked == []
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    unreachable = await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client, revocation_endpoint="http://127.0.0.1:9/revoke")],
        store={"path": str(broker.tmp / "other" / "broker.db")},
        listen=["127.0.0.1:0"],
    )
    await unreachable.connect("alice")
    answer = await _disconnect(unreachable)
    assert answer.deleted
    assert {r.reason for r in answer.revocations} == {"unreachable"}


async def test_disconnect_bad_input(broker: Broker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Disconnect(pb.DisconnectRequest(user_id="alice", upstream="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id=""))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _discovered(auth: AuthServer, client: Any, **extra: Any) -> dict[str, Any]:
    doc = upstream_doc(auth, client, issuer=auth.issuer, **extra)
    del doc["auth_broker"]["token_endpoint"], doc["auth_broker"]["authorization_endpoint"]
    return doc


async def test_discovery_from_the_issuer_metadata(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    broker = await make_broker(client=client, upstreams=[_discovered(auth_server, client)])
    auth = broker.app.config.upstreams[0].auth_broker
    assert auth.token_endpoint == auth_server.token_endpoint
    assert auth.authorization_endpoint == auth_server.authorization_endpoint
    assert auth.revocation_endpoint == auth_server.revocation_endpoint
    assert auth.authorization_response_iss_parameter_supported is True
    assert [r.path for r in auth_server.requests] == ["/.well-known/oauth-authorization-server"]
    await _complete(broker)  # sends the iss from the callback
    access = (await broker.resolve("alice")).access_token
    answer = await _disconnect(broker)
    assert [r.outcome for r in answer.revocations] == ["revoked", "revoked"]
    assert broker.auth.access_token_info(access) is None


async def test_discovery_refuses_a_foreign_or_missing_document(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    wrong = _discovered(auth_server, client)
    wrong["auth_broker"]["issuer"] = auth_server.issuer + "/tenant"  # its document says another issuer
    with pytest.raises(ConfigError, match=r"upstreams\[0\].auth_broker.issuer: metadata could not be used"):
        await make_broker(client=client, upstreams=[wrong])
    gone = _discovered(auth_server, client)
    gone["auth_broker"]["issuer"] = "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="unreachable"):
        await make_broker(client=client, upstreams=[gone])


async def _complete(broker: Broker, **callback_overrides: str) -> pb.CompleteResponse:
    started = await broker.start_flow("alice")
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    callback.update(callback_overrides)
    return await broker.stub.Complete(
        pb.CompleteRequest(
            state=started.state, code=callback["code"], user_id="alice", iss=callback.get("iss", "")
        )
    )


async def test_iss_is_checked_when_the_server_sends_it(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    broker = await make_broker(client=client, upstreams=[_discovered(auth_server, client)])
    for bad in ("https://evil.test", ""):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _complete(broker, iss=bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(info.value).reason == "ISSUER_MISMATCH"
    assert broker.auth.token_requests() == []  # the code never went to a token endpoint
    assert (await _complete(broker)).credential.user_id == "alice"


async def test_iss_checked_against_a_configured_issuer_without_discovery(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    doc = upstream_doc(auth_server, client, issuer=auth_server.issuer)
    doc["auth_broker"]["authorization_response_iss_parameter_supported"] = False
    broker = await make_broker(client=client, upstreams=[doc])
    assert [r.path for r in auth_server.requests] == ["/.well-known/oauth-authorization-server"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _complete(broker, iss="https://evil.test")
    assert error_info(info.value).reason == "ISSUER_MISMATCH"
    assert (await _complete(broker, iss="")).credential.user_id == "alice"  # not advertised: optional
