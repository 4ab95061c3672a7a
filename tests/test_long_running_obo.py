"""Long-running on-behalf-of (issue 14): with ``store_refresh_token: true`` a token_exchange or
entra_obo upstream keeps the refresh token the exchange returned (sealed) and renews the
exchanged token with it once the user's own token is gone: Resolve without a subject token (or
with an expired one), Refresh, and the background refresher all work. Against the real loopback
authorization server, whose user tokens really expire."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.config import load_config
from broker.errors import ConfigError
from tests.authserver import GRANT_JWT_BEARER, GRANT_REFRESH_TOKEN, GRANT_TOKEN_EXCHANGE, AuthServer
from tests.conftest import BrokerFactory, error_info
from tests.test_token_exchange import EXCHANGE, OBO, exchange_doc, obo_doc

FAST = {
    "enabled": True,
    "ahead_seconds": 300,
    "max_concurrent": 4,
    "interval_seconds": 0.05,
    "separate_process": False,  # the refresher in this process: the test drives and reads it
}


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _long_running(doc: dict[str, Any]) -> dict[str, Any]:
    doc["auth_broker"]["store_refresh_token"] = True
    return doc


async def _short_lived_user_token(auth: AuthServer, user: str) -> str:
    """A real user token of ``user`` that the authorization server accepts for two seconds."""
    token = auth.issue_user_token(user, ttl=2.0)
    assert auth.access_token_info(token) is not None
    return token


async def _until_expired(auth: AuthServer, token: str) -> None:
    deadline = time.monotonic() + 10
    while auth.access_token_info(token) is not None:
        assert time.monotonic() < deadline, "the user token did not expire"
        await asyncio.sleep(0.05)


async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_long_running_obo_keeps_working_after_the_subject_token_expired(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await make_broker(upstreams=[_long_running(obo_doc(auth_server))])
    user_token = await _short_lived_user_token(auth_server, "alice")
    first = await broker.resolve("alice", OBO, subject_token=user_token)
    assert len(auth_server.token_requests(GRANT_JWT_BEARER)) == 1
    await _until_expired(auth_server, user_token)

    # The exchanged token nears its end; the user's own token is gone.
    broker.clock.advance(3600 - 30)
    renewed = await broker.resolve("alice", OBO)  # no subject token at all
    assert renewed.access_token != first.access_token
    info = auth_server.access_token_info(renewed.access_token)
    assert info is not None and info["user"] == "alice" and info["grant_type"] == GRANT_REFRESH_TOKEN
    assert renewed.obtained_via == "entra_obo"
    (refresh,) = auth_server.token_requests(GRANT_REFRESH_TOKEN)
    assert refresh.form["scope"] == ["https://graph.example/.default"]  # Entra wants it on refresh

    # A caller still sending the expired user token: the exchange is refused, the stored grant
    # renews the credential instead.
    broker.clock.advance(3600 - 30)
    again = await broker.resolve("alice", OBO, subject_token=user_token)
    assert len(auth_server.token_requests(GRANT_JWT_BEARER)) == 2  # the refused exchange
    assert len(auth_server.token_requests(GRANT_REFRESH_TOKEN)) == 2
    assert auth_server.access_token_info(again.access_token) is not None

    # Refresh works on such an upstream (instead of UNIMPLEMENTED).
    done = await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=OBO))
    assert done.credential.obtained_via == "entra_obo"
    assert len(auth_server.token_requests(GRANT_REFRESH_TOKEN)) == 3
    latest = await broker.resolve("alice", OBO)
    assert auth_server.access_token_info(latest.access_token) is not None
    assert latest.access_token != again.access_token


async def test_token_exchange_with_store_refresh_token_renews_without_the_user(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    auth_server.exchange_refresh_token = True
    broker = await make_broker(upstreams=[_long_running(exchange_doc(auth_server))])
    user_token = await _short_lived_user_token(auth_server, "alice")
    first = await broker.resolve("alice", EXCHANGE, subject_token=user_token)
    await _until_expired(auth_server, user_token)
    broker.clock.advance(3600 - 30)
    renewed = await broker.resolve("alice", EXCHANGE)
    assert renewed.access_token != first.access_token
    info = auth_server.access_token_info(renewed.access_token)
    assert info is not None and info["user"] == "alice"
    (refresh,) = auth_server.token_requests(GRANT_REFRESH_TOKEN)
    assert refresh.form["resource"] == ["https://api.example/v1"]
    assert "scope" not in refresh.form  # RFC 6749 section 6: the original grant stands
    assert len(auth_server.token_requests(GRANT_TOKEN_EXCHANGE)) == 1


async def test_the_background_refresher_renews_long_running_obo_credentials(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await make_broker(upstreams=[_long_running(obo_doc(auth_server))], background_refresh=FAST)
    user_token = await _short_lived_user_token(auth_server, "alice")
    await broker.resolve("alice", OBO, subject_token=user_token)
    await _until_expired(auth_server, user_token)
    await asyncio.sleep(0.3)  # several ticks: a fresh token is not due
    assert auth_server.token_requests(GRANT_REFRESH_TOKEN) == []
    broker.clock.advance(3600 - 200)
    await _until(lambda: len(auth_server.token_requests(GRANT_REFRESH_TOKEN)) == 1)

    def stored() -> dict[str, Any]:
        (row,) = broker.rows("SELECT status, expires_at FROM credentials")
        return row

    await _until(lambda: stored()["expires_at"] > broker.clock.now() + 3000)
    assert stored()["status"] == "connected"
    resolved = await broker.resolve("alice", OBO)  # served as stored: no request
    assert auth_server.access_token_info(resolved.access_token) is not None
    assert len(auth_server.token_requests()) == 2


async def test_a_dead_stored_grant_asks_for_the_users_token_again(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await make_broker(upstreams=[_long_running(obo_doc(auth_server))])
    user_token = await _short_lived_user_token(auth_server, "alice")
    await broker.resolve("alice", OBO, subject_token=user_token)
    auth_server.revoke_user("alice")
    broker.clock.advance(3600 - 30)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.resolve("alice", OBO)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(refused.value).reason == "SUBJECT_TOKEN_REQUIRED"
    with pytest.raises(grpc.aio.AioRpcError) as refresh:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=OBO))
    assert error_info(refresh.value).reason == "SUBJECT_TOKEN_REQUIRED"
    # A fresh user token starts over with a new exchange.
    fresh = auth_server.issue_user_token("alice", ttl=60)
    resolved = await broker.resolve("alice", OBO, subject_token=fresh)
    assert auth_server.access_token_info(resolved.access_token) is not None


async def test_without_store_refresh_token_nothing_changes(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await make_broker(upstreams=[obo_doc(auth_server)])
    user_token = await _short_lived_user_token(auth_server, "alice")
    await broker.resolve("alice", OBO, subject_token=user_token)
    with pytest.raises(grpc.aio.AioRpcError) as refresh:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=OBO))
    assert refresh.value.code() == grpc.StatusCode.UNIMPLEMENTED
    broker.clock.advance(3600 + 30)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.resolve("alice", OBO)
    assert error_info(refused.value).reason == "SUBJECT_TOKEN_REQUIRED"
    assert auth_server.token_requests(GRANT_REFRESH_TOKEN) == []


def test_store_refresh_token_is_only_for_exchange_modes(tmp_path: Any, auth_server: AuthServer) -> None:
    from tests.conftest import upstream_doc

    client = auth_server.new_client()
    doc = upstream_doc(auth_server, client, store_refresh_token=True)
    keyring = tmp_path / "k.json"
    with pytest.raises(ConfigError) as refused:
        load_config({"upstreams": [doc], "keyring": {"file": str(keyring)}}, environ={}, base_dir=tmp_path)
    assert "store_refresh_token" in str(refused.value)
    assert "token_exchange" in str(refused.value)
