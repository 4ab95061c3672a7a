"""Refresh requests follow RFC 6749 section 6 on scope, and a refused refresh that Resolve started
does not take away a token that is still good enough for the caller."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker, error_info


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


async def test_refresh_sends_no_scope_and_keeps_the_original_grant(broker: Broker) -> None:
    done = await broker.connect("alice")
    assert tuple(done.credential.scopes) == ("repo", "read:user")
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    broker.clock.advance(3600 - 30)
    resolved = await broker.resolve("alice")  # a refresh Resolve starts
    requests = broker.auth.token_requests("refresh_token")
    assert len(requests) == 2
    assert [r.form.get("scope") for r in requests] == [None, None]  # the original grant stands
    assert broker.auth.access_token_info(resolved.access_token)["scope"] == "repo read:user"
    assert tuple(resolved.scopes) == ("repo", "read:user")


# Refusals that are not the end of the grant (broker/lifecycle.py): the request was wrong or the
# server is confused, the refresh token may still work later.
REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("oauth_error", {"error": "invalid_scope"}, "invalid_scope"),
    ("oauth_error", {"error": "invalid_request"}, "invalid_request"),
    (
        "custom",
        {"status": 403, "body": b"<html>forbidden</html>", "headers": {"Content-Type": "text/html"}},
        "http_403",
    ),
]


@pytest.mark.parametrize(("kind", "options", "recorded"), REFUSALS, ids=[r[2] for r in REFUSALS])
async def test_a_refused_refresh_serves_the_cached_token_while_it_meets_the_floor(
    broker: Broker, kind: str, options: dict[str, Any], recorded: str
) -> None:
    await broker.connect("alice")
    first = await broker.resolve("alice")
    broker.clock.advance(3600 - 40)  # inside the 60 s refresh window, valid for 40 s more
    broker.auth.fail_next(kind, **options)
    served = await broker.resolve("alice", min_valid_seconds=30)
    assert served.access_token == first.access_token
    assert served.expires_at.seconds == first.expires_at.seconds  # the true expiry, unchanged
    assert len(broker.auth.token_requests("refresh_token")) == 1  # it did try
    # The error is on the connection for operators and apps to see.
    (connection,) = (
        await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id="alice"))
    ).connections
    assert connection.last_error == recorded
    row = broker.rows(
        "SELECT status, last_error, failure_count FROM credentials WHERE user_id = ?", ("alice",)
    )
    assert row == [{"status": "error", "last_error": recorded, "failure_count": 1}]
    # A caller who needs more than the cached token has gets the error, not a short token.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice", min_valid_seconds=50)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
    assert error_info(info.value).reason in ("UPSTREAM_UNAVAILABLE", "TOKEN_REQUEST_REJECTED")
    # Once the server accepts again (after the backoff), the credential is connected again.
    broker.clock.advance(2)
    renewed = await broker.resolve("alice")
    assert renewed.access_token != first.access_token
    (connection,) = (
        await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id="alice"))
    ).connections
    assert (connection.status, connection.last_error) == ("connected", "")


async def test_a_refused_refresh_with_no_usable_cached_token_is_an_error(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(3600 - 40)
    broker.auth.fail_next("oauth_error", error="invalid_scope")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice", min_valid_seconds=50)  # the cached token has 40 s left
    detail = error_info(info.value)
    assert detail.reason == "TOKEN_REQUEST_REJECTED" and detail.metadata["oauth_error"] == "invalid_scope"


async def test_a_terminal_refusal_is_not_hidden_by_the_cached_token(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(3600 - 40)
    broker.auth.fail_next("oauth_error", error="invalid_grant")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert error_info(info.value).reason == "RECONNECT_REQUIRED"
