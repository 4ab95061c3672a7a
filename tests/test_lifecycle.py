"""Credential lifecycle: statuses, transient failures with backoff, terminal errors, the
invalid_grant race check. Nothing is deleted because of an error."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.crypto import EnvelopeCipher, FileKeySource
from broker.lifecycle import BACKOFF_CAP_SECONDS, backoff_seconds
from broker.models import Credential, Secrets
from broker.vault import CredentialVault
from tests import leakcheck
from tests.authserver import RecordedRequest
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


def _row(broker: Broker, user: str = "alice") -> dict[str, Any]:
    return broker.rows("SELECT * FROM credentials WHERE user_id = ?", (user,))[0]


async def _refresh(broker: Broker, user: str = "alice") -> pb.RefreshResponse:
    return await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    import random

    rng = random.Random(7)
    first = [backoff_seconds(1, rng) for _ in range(50)]
    assert all(0.5 <= b <= 1.0 for b in first) and len(set(first)) > 1
    assert all(8.0 <= backoff_seconds(5, rng) <= 16.0 for _ in range(50))
    assert backoff_seconds(10_000, rng) <= BACKOFF_CAP_SECONDS


async def test_transient_failures_are_counted_kept_and_cleared(broker: Broker) -> None:
    await broker.connect("alice")
    assert _row(broker)["status"] == "connected"
    for attempt, kind, error in ((1, "503", "http_5xx"), (2, "junk", "invalid_response")):
        broker.auth.fail_next(kind)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _refresh(broker)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        row = _row(broker)
        assert (row["status"], row["last_error"], row["failure_count"]) == ("error", error, attempt)
        assert row["next_attempt_at"] > broker.clock.now()
        assert row["lease_owner"] is None  # released
    await _refresh(broker)
    row = _row(broker)
    assert (row["status"], row["failure_count"], row["next_attempt_at"]) == ("connected", 0, None)
    assert row["last_refresh_at"] == pytest.approx(broker.clock.now())


async def test_backoff_holds_refreshes_and_a_valid_token_is_served(broker: Broker) -> None:
    await broker.connect("alice")
    first = await broker.resolve("alice")
    broker.clock.advance(3600 - 30)  # in the refresh window, still valid for 30 s
    broker.auth.fail_next("500")
    assert (await broker.resolve("alice")).access_token == first.access_token
    asked = len(broker.auth.token_requests("refresh_token"))
    for _ in range(5):  # inside the backoff: no request at all, the cached token is served
        assert (await broker.resolve("alice")).access_token == first.access_token
    assert len(broker.auth.token_requests("refresh_token")) == asked
    broker.clock.advance(2)  # past the first backoff (at most 1 s)
    renewed = await broker.resolve("alice")
    assert renewed.access_token != first.access_token
    assert _row(broker)["status"] == "connected"


async def test_authorization_server_down_serves_cached_token(make_broker: BrokerFactory) -> None:
    broker = await make_broker(http={"timeout_seconds": 0.5})
    await broker.connect("alice")
    first = await broker.resolve("alice")
    broker.clock.advance(3600 - 30)
    broker.auth.fail_next("timeout", seconds=2)
    assert (await broker.resolve("alice")).access_token == first.access_token
    assert _row(broker)["last_error"] == "timeout"
    broker.auth.stop()  # connection refused from now on
    broker.clock.advance(5)
    assert (await broker.resolve("alice")).access_token == first.access_token
    row = _row(broker)
    assert (row["status"], row["last_error"], row["failure_count"]) == ("error", "unreachable", 2)
    broker.clock.advance(25)  # expired now: a clear UNAVAILABLE, and the credential is kept
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _row(broker)["status"] == "error"


async def test_invalid_client_needs_reauth_and_keeps_the_row(broker: Broker) -> None:
    await broker.connect("alice")
    broker.auth.fail_next("oauth_error", status=401, error="invalid_client")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _refresh(broker)
    assert error_info(info.value).reason == "RECONNECT_REQUIRED"
    row = _row(broker)
    assert (row["status"], row["last_error"]) == ("needs_reauth", "invalid_client")


async def test_invalid_grant_after_a_concurrent_reconnect_is_a_race_not_a_revocation(broker: Broker) -> None:
    await broker.connect("alice")
    keyring = FileKeySource(broker.app.config.keyring.file).load()
    key = broker.app.config.upstreams[0].key
    fresh = Secrets("at_written-meanwhile-by-another-writer", "rt_written-meanwhile-by-another-writer")
    leakcheck.add_secret(fresh.access_token, fresh.refresh_token or "")

    def meanwhile(request: RecordedRequest) -> None:
        if request.form.get("grant_type") != ["refresh_token"]:
            return
        broker.auth.before_token_response = None
        store = broker.open_store()
        try:
            now = broker.clock.now()
            credential = Credential("alice", key, fresh, "Bearer", ("repo",), now + 3600, "connect_flow", now)
            CredentialVault(store, EnvelopeCipher(keyring)).save(credential, None, now)
        finally:
            store.close()

    broker.auth.before_token_response = meanwhile
    broker.auth.fail_next("oauth_error", error="invalid_grant")
    broker.clock.advance(3600)
    resolved = await broker.resolve("alice")
    assert resolved.access_token == fresh.access_token
    assert _row(broker)["status"] == "connected"
