"""A token endpoint that rate-limits (HTTP 429, Retry-After) during exchanges and renewals.

429 says "not now", not "never": the grant and the user's token are fine. A connect upstream
already serves a token still valid for the caller's ``min_valid_seconds`` while refreshes are
refused that way (tests/test_refresh_resolve.py). Exchange upstreams must do the same, and a
long-running on-behalf-of credential whose renewal is rate-limited (or refused in any other
way that does not end the grant) must never be reported as a dead grant
(SUBJECT_TOKEN_REQUIRED: "the stored grant can no longer be renewed; send the user's token").
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from tests.authserver import GRANT_REFRESH_TOKEN, GRANT_TOKEN_EXCHANGE, AuthServer
from tests.conftest import Broker, BrokerFactory, error_info
from tests.test_token_exchange import EXCHANGE, exchange_doc, subject

RATE_LIMITED: dict[str, Any] = {
    "status": 429,
    "body": json.dumps({"error": "rate_limited", "error_description": "slow down"}).encode(),
    "headers": {"Content-Type": "application/json", "Retry-After": "30"},
}


@pytest.fixture
async def exchange(make_broker: BrokerFactory, auth_server: AuthServer) -> Broker:
    return await make_broker(upstreams=[exchange_doc(auth_server)])


@pytest.fixture
async def long_running(make_broker: BrokerFactory, auth_server: AuthServer) -> Broker:
    auth_server.exchange_refresh_token = True
    return await make_broker(upstreams=[exchange_doc(auth_server, store_refresh_token=True)])


def _rejected_429(info: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> None:
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    detail = error_info(info.value)
    assert (detail.reason, detail.metadata["http_status"]) == ("TOKEN_REQUEST_REJECTED", "429")


async def test_a_rate_limited_exchange_serves_the_cached_token_still_valid(
    exchange: Broker, auth_server: AuthServer
) -> None:
    token = subject(auth_server, "alice")
    first = await exchange.resolve("alice", EXCHANGE, subject_token=token)
    exchange.clock.advance(3600 - 30)  # in the refresh window, 30 s left
    auth_server.fail_next("custom", **RATE_LIMITED)
    again = await exchange.resolve("alice", EXCHANGE, subject_token=token)
    assert again.access_token == first.access_token
    # Not valid for what the caller asks: the refusal, as it came.
    auth_server.fail_next("custom", **RATE_LIMITED)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await exchange.resolve("alice", EXCHANGE, subject_token=token, min_valid_seconds=120)
    _rejected_429(info)
    assert len(auth_server.token_requests(GRANT_TOKEN_EXCHANGE)) == 3


async def test_a_rate_limited_renewal_serves_the_cached_token_still_valid(
    long_running: Broker, auth_server: AuthServer
) -> None:
    first = await long_running.resolve("alice", EXCHANGE, subject_token=subject(auth_server, "alice"))
    long_running.clock.advance(3600 - 30)
    auth_server.fail_next("custom", **RATE_LIMITED)
    again = await long_running.resolve("alice", EXCHANGE)  # no subject token: renewal
    assert again.access_token == first.access_token
    assert len(auth_server.token_requests(GRANT_REFRESH_TOKEN)) == 1


async def test_a_rate_limited_renewal_is_not_a_dead_grant(
    long_running: Broker, auth_server: AuthServer
) -> None:
    await long_running.resolve("alice", EXCHANGE, subject_token=subject(auth_server, "alice"))
    long_running.clock.advance(3600 + 30)  # the cached token is gone
    auth_server.fail_next("custom", **RATE_LIMITED)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await long_running.resolve("alice", EXCHANGE)
    _rejected_429(info)
    (row,) = long_running.rows("SELECT status, last_error FROM credentials WHERE user_id = ?", ("alice",))
    assert row == {"status": "error", "last_error": "http_429"}
    # The grant was never dead: once the limit passes it renews without the user's token.
    long_running.clock.advance(600)  # past the backoff
    renewed = await long_running.resolve("alice", EXCHANGE)
    assert auth_server.access_token_info(renewed.access_token) is not None


async def test_a_rate_limited_exchange_is_not_answered_as_a_dead_grant(
    long_running: Broker, auth_server: AuthServer
) -> None:
    """The exchange itself is rate-limited: the user's token was not refused, so the stored grant
    is not asked to stand in for it (a second request to a server that said "slow down"), and the
    caller is not told to send the token it just sent."""
    token = subject(auth_server, "alice")
    first = await long_running.resolve("alice", EXCHANGE, subject_token=token)
    long_running.clock.advance(3600 - 30)
    auth_server.fail_next("custom", **RATE_LIMITED)
    again = await long_running.resolve("alice", EXCHANGE, subject_token=token)
    assert again.access_token == first.access_token
    long_running.clock.advance(60)  # expired now
    auth_server.fail_next("custom", **RATE_LIMITED)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await long_running.resolve("alice", EXCHANGE, subject_token=token)
    _rejected_429(info)
    assert auth_server.token_requests(GRANT_REFRESH_TOKEN) == []
