"""Resolve for token_exchange (RFC 8693) and entra_obo upstreams, against the real loopback
authorization server: forms, caching, re-exchange, errors, single flight, isolation."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import grpc
import pytest

from tests.authserver import GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN, AuthServer
from tests.conftest import Broker, BrokerFactory, error_info

EXCHANGE = "api"
OBO = "graph"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def exchange_doc(
    auth: AuthServer, auth_method: str = "client_secret_basic", **overrides: Any
) -> dict[str, Any]:
    client = auth.new_client(auth_method=auth_method)
    ab: dict[str, Any] = {
        "mode": "token_exchange",
        "token_endpoint": auth.token_endpoint,
        "client_id": client.client_id,
        "token_endpoint_auth_method": auth_method,
        "scopes": ["read", "write"],
        "audience": ["https://api.example", "https://api2.example"],
        "resource": "https://api.example/v1",
    }
    if client.client_secret is not None:
        ab["client_secret"] = client.client_secret
    ab.update(overrides)
    return {"name": EXCHANGE, "url": "https://api.example", "auth_broker": ab}


def obo_doc(auth: AuthServer) -> dict[str, Any]:
    client = auth.new_client(auth_method="client_secret_post")
    return {
        "name": OBO,
        "url": "https://graph.example",
        "auth_broker": {
            "mode": "entra_obo",
            "token_endpoint": auth.token_endpoint,
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "token_endpoint_auth_method": "client_secret_post",
            "scopes": ["https://graph.example/.default"],
        },
    }


def subject(auth: AuthServer, user: str) -> str:
    token = f"subj-{user}-{secrets.token_urlsafe(16)}"
    auth.exchange_users[token] = user
    return token


@pytest.fixture
async def xbroker(make_broker: BrokerFactory, auth_server: AuthServer) -> Broker:
    return await make_broker(upstreams=[exchange_doc(auth_server), obo_doc(auth_server)])


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post", "none"])
async def test_token_exchange_happy_path_sends_every_field(
    make_broker: BrokerFactory, auth_server: AuthServer, auth_method: str
) -> None:
    doc = exchange_doc(auth_server, auth_method)
    broker = await make_broker(upstreams=[doc])
    token = subject(auth_server, "alice")
    resolved = await broker.resolve("alice", EXCHANGE, subject_token=token)
    (request,) = auth_server.token_requests(GRANT_TOKEN_EXCHANGE)
    form = dict(request.form)
    client_id = doc["auth_broker"]["client_id"]
    if auth_method == "client_secret_basic":
        assert request.headers["authorization"].startswith("Basic ")
    elif auth_method == "client_secret_post":
        assert form.pop("client_id") == [client_id] and form.pop("client_secret")
    else:
        assert form.pop("client_id") == [client_id] and "authorization" not in request.headers
    assert form == {
        "grant_type": [GRANT_TOKEN_EXCHANGE],
        "subject_token": [token],
        "subject_token_type": [TOKEN_TYPE_ACCESS_TOKEN],
        "requested_token_type": [TOKEN_TYPE_ACCESS_TOKEN],
        "audience": ["https://api.example", "https://api2.example"],
        "resource": ["https://api.example/v1"],
        "scope": ["read write"],
    }
    info = auth_server.access_token_info(resolved.access_token)
    assert info is not None and info["user"] == "alice" and info["audience"] == doc["auth_broker"]["audience"]
    assert resolved.obtained_via == "token_exchange" and resolved.token_type == "Bearer"
    assert list(resolved.scopes) == ["read", "write"]
    assert resolved.header_value == f"Bearer {resolved.access_token}"
    assert resolved.expires_at.seconds == pytest.approx(broker.clock.now() + 3600, abs=1)
    assert token.encode() not in broker.db_bytes()


async def test_configured_token_types_are_sent(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    doc = exchange_doc(auth_server, subject_token_type=JWT_TYPE, requested_token_type=JWT_TYPE, scopes=[])
    broker = await make_broker(upstreams=[doc])
    resolved = await broker.resolve("alice", EXCHANGE, subject_token=subject(auth_server, "alice"))
    (request,) = auth_server.token_requests(GRANT_TOKEN_EXCHANGE)
    assert request.form["subject_token_type"] == [JWT_TYPE]
    assert request.form["requested_token_type"] == [JWT_TYPE]
    assert "scope" not in request.form
    assert resolved.scopes == []  # none granted, none requested


async def test_entra_obo_happy_path(xbroker: Broker, auth_server: AuthServer) -> None:
    token = subject(auth_server, "alice")
    resolved = await xbroker.resolve("alice", OBO, subject_token=token)
    (request,) = auth_server.token_requests(GRANT_JWT_BEARER)
    form = dict(request.form)
    assert form.pop("client_secret") and form.pop("client_id")
    assert form == {
        "grant_type": [GRANT_JWT_BEARER],
        "assertion": [token],
        "requested_token_use": ["on_behalf_of"],
        "scope": ["https://graph.example/.default"],
    }
    assert resolved.obtained_via == "entra_obo"
    assert list(resolved.scopes) == ["https://graph.example/.default"]
    assert auth_server.access_token_info(resolved.access_token)["user"] == "alice"
    # Entra's answer carried a refresh token: it is not kept (renewal is a new exchange).
    assert not any(t.startswith("rt_") and t.encode() in xbroker.db_bytes() for t in auth_server.issued)


async def test_cache_hit_then_near_expiry_re_exchange(xbroker: Broker, auth_server: AuthServer) -> None:
    token = subject(auth_server, "alice")
    first = await xbroker.resolve("alice", EXCHANGE, subject_token=token)
    xbroker.clock.advance(3600 - 61)
    # Cached: with or without a subject token, no second exchange.
    assert (await xbroker.resolve("alice", EXCHANGE, subject_token=token)).access_token == first.access_token
    assert (await xbroker.resolve("alice", EXCHANGE)).access_token == first.access_token
    assert len(auth_server.token_requests(GRANT_TOKEN_EXCHANGE)) == 1
    xbroker.clock.advance(2)  # inside the 60 s refresh window
    # No subject token: still valid for the caller's minimum, so served as is.
    assert (await xbroker.resolve("alice", EXCHANGE)).access_token == first.access_token
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await xbroker.resolve("alice", EXCHANGE, min_valid_seconds=120)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(info.value).reason == "SUBJECT_TOKEN_REQUIRED"
    # With one: exchanged again.
    second = await xbroker.resolve("alice", EXCHANGE, subject_token=token)
    assert second.access_token != first.access_token
    assert len(auth_server.token_requests(GRANT_TOKEN_EXCHANGE)) == 2
    xbroker.clock.advance(3600)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await xbroker.resolve("alice", EXCHANGE)
    assert error_info(expired.value).reason == "SUBJECT_TOKEN_REQUIRED"


async def test_missing_subject_token(xbroker: Broker) -> None:
    for upstream in (EXCHANGE, OBO):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await xbroker.resolve("alice", upstream)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "subject_token: required" in info.value.details()
    assert xbroker.auth.token_requests() == []


@pytest.mark.parametrize(
    ("kind", "options", "code", "oauth_error"),
    [
        ("oauth_error", {"error": "invalid_grant"}, grpc.StatusCode.FAILED_PRECONDITION, "invalid_grant"),
        ("oauth_error", {"error": "evil <b>", "status": 401}, grpc.StatusCode.FAILED_PRECONDITION, None),
        ("bad_error", {}, grpc.StatusCode.FAILED_PRECONDITION, None),
        ("503", {}, grpc.StatusCode.UNAVAILABLE, None),
        ("junk", {}, grpc.StatusCode.UNAVAILABLE, None),
    ],
)
async def test_server_errors_are_sanitized_and_not_cached(
    xbroker: Broker,
    auth_server: AuthServer,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    options: dict[str, Any],
    code: grpc.StatusCode,
    oauth_error: str | None,
) -> None:
    caplog.set_level(logging.DEBUG, logger="credential_broker")
    token = subject(auth_server, "alice")
    auth_server.fail_next(kind, **options)
    for upstream in (EXCHANGE,):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await xbroker.resolve("alice", upstream, subject_token=token)
        assert info.value.code() == code
        detail = error_info(info.value)
        assert detail.metadata.get("oauth_error") == oauth_error
        text = info.value.details() + str(detail) + caplog.text
        assert token not in text and "you sent" not in text and "evil" not in text and "script" not in text
    # One exchange, no retry; nothing was cached.
    assert len(auth_server.token_requests(GRANT_TOKEN_EXCHANGE)) == 1
    with pytest.raises(grpc.aio.AioRpcError) as uncached:
        await xbroker.resolve("alice", EXCHANGE)
    assert error_info(uncached.value).reason == "SUBJECT_TOKEN_REQUIRED"
    # The next call with the token works.
    assert (await xbroker.resolve("alice", EXCHANGE, subject_token=token)).access_token


async def test_unexpected_issued_token_type_is_refused(xbroker: Broker, auth_server: AuthServer) -> None:
    auth_server.issued_token_type_override = "urn:ietf:params:oauth:token-type:id_token"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await xbroker.resolve("alice", EXCHANGE, subject_token=subject(auth_server, "alice"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "issued_token_type" in info.value.details()
    assert b"at_" not in xbroker.db_bytes()


async def test_twelve_concurrent_resolves_make_one_exchange(xbroker: Broker, auth_server: AuthServer) -> None:
    token = subject(auth_server, "alice")
    auth_server.fail_next("timeout", seconds=0.5)  # a slow answer: every caller piles up
    results = await asyncio.gather(
        *(xbroker.resolve("alice", EXCHANGE, subject_token=token) for _ in range(12))
    )
    assert len({r.access_token for r in results}) == 1
    assert len(auth_server.token_requests(GRANT_TOKEN_EXCHANGE)) == 1
    assert xbroker.app.exchanger is not None and xbroker.app.exchanger.exchanges == 1


async def test_concurrent_callers_share_a_failure_without_retry(
    xbroker: Broker, auth_server: AuthServer
) -> None:
    token = subject(auth_server, "alice")
    auth_server.fail_next("oauth_error", error="invalid_grant", delay=0.5)
    results = await asyncio.gather(
        *(xbroker.resolve("alice", EXCHANGE, subject_token=token) for _ in range(6)), return_exceptions=True
    )
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        assert error_info(result).reason == "TOKEN_REQUEST_REJECTED"
    assert len(auth_server.token_requests(GRANT_TOKEN_EXCHANGE)) == 1


async def test_users_never_get_each_others_exchanged_credential(
    xbroker: Broker, auth_server: AuthServer
) -> None:
    alice = await xbroker.resolve("alice", EXCHANGE, subject_token=subject(auth_server, "alice"))
    bob = await xbroker.resolve("bob", EXCHANGE, subject_token=subject(auth_server, "bob"))
    assert auth_server.access_token_info(alice.access_token)["user"] == "alice"
    assert auth_server.access_token_info(bob.access_token)["user"] == "bob"
    assert (await xbroker.resolve("alice", EXCHANGE)).access_token == alice.access_token
    assert (await xbroker.resolve("bob", EXCHANGE)).access_token == bob.access_token
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await xbroker.resolve("carol", EXCHANGE)
    assert error_info(info.value).reason == "SUBJECT_TOKEN_REQUIRED"
    # Concurrent exchanges for different users are separate flights.
    tokens = {user: subject(auth_server, user) for user in ("dave", "erin")}
    xbroker.clock.advance(3600)
    auth_server.fail_next("timeout", seconds=0.3)
    results = await asyncio.gather(
        *(xbroker.resolve(user, EXCHANGE, subject_token=tokens[user]) for user in ("dave", "erin") * 3)
    )
    for user, result in zip(("dave", "erin") * 3, results, strict=True):
        assert auth_server.access_token_info(result.access_token)["user"] == user


async def test_server_down_serves_a_still_valid_exchanged_token(
    xbroker: Broker, auth_server: AuthServer
) -> None:
    token = subject(auth_server, "alice")
    first = await xbroker.resolve("alice", EXCHANGE, subject_token=token)
    xbroker.clock.advance(3600 - 30)
    auth_server.fail_next("503")
    assert (await xbroker.resolve("alice", EXCHANGE, subject_token=token)).access_token == first.access_token
    auth_server.fail_next("503")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await xbroker.resolve("alice", EXCHANGE, subject_token=token, min_valid_seconds=120)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_entra_obo_config_needs_scopes(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    from broker.errors import ConfigError

    doc = obo_doc(auth_server)
    doc["auth_broker"]["scopes"] = []
    with pytest.raises(ConfigError, match=r"scopes: required for mode entra_obo"):
        await make_broker(upstreams=[doc])


async def test_exchanges_are_audited_without_the_subject_token(
    xbroker: Broker, auth_server: AuthServer
) -> None:
    token = subject(auth_server, "alice")
    await xbroker.resolve("alice", EXCHANGE, subject_token=token)
    await xbroker.resolve("alice", EXCHANGE, subject_token=token)  # cached: no second exchange event
    auth_server.fail_next("503")
    xbroker.clock.advance(3600)
    with pytest.raises(grpc.aio.AioRpcError):
        await xbroker.resolve("alice", EXCHANGE, subject_token=token)
    events = [e for e in xbroker.extra["audit"].events if e.action == "exchange"]
    assert [(e.outcome, e.user, e.upstream, e.reason) for e in events] == [
        ("success", "alice", EXCHANGE, ""),
        ("failure", "alice", EXCHANGE, "UPSTREAM_UNAVAILABLE"),
    ]
    assert token not in "\n".join(e.to_json() for e in xbroker.extra["audit"].events)


@pytest.mark.parametrize("upstream", [EXCHANGE, OBO])
@pytest.mark.parametrize("error", ["invalid_grant", "interaction_required", "not-a-known-code"])
async def test_http_200_carrying_error_is_a_rejection_not_an_outage(
    xbroker: Broker, auth_server: AuthServer, caplog: pytest.LogCaptureFixture, upstream: str, error: str
) -> None:
    """Some servers refuse a token exchange or an on-behalf-of request with HTTP 200 and an
    ``error`` field. That is a refusal (TOKEN_REQUEST_REJECTED), never UNAVAILABLE."""
    caplog.set_level(logging.DEBUG, logger="credential_broker")
    token = subject(auth_server, "alice")
    auth_server.fail_next("oauth_error", status=200, error=error)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await xbroker.resolve("alice", upstream, subject_token=token)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = error_info(info.value)
    assert detail.reason == "TOKEN_REQUEST_REJECTED"
    assert detail.metadata["http_status"] == "200"
    # Only an RFC 6749 / OpenID code is passed on; anything else is dropped.
    assert detail.metadata.get("oauth_error") == (None if error == "not-a-known-code" else error)
    text = info.value.details() + str(detail) + caplog.text
    assert token not in text and "you sent" not in text
    # The next call with the token works: nothing was cached.
    assert (await xbroker.resolve("alice", upstream, subject_token=token)).access_token
