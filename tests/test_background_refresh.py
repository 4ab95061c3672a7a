"""Background refresh (broker/refresher.py): credentials are refreshed ahead of expiry, and kept
alive on upstreams that revoke idle refresh tokens, with no Resolve; never a needs_reauth one;
a failing upstream is retried only after its backoff; two broker processes on one store refresh
each credential exactly once. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.authserver import AuthServer
from tests.brokerproc import ServerProcess, write_config
from tests.conftest import UPSTREAM, Broker, BrokerFactory, RequestHeader, upstream_doc

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


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _refreshes(auth: AuthServer) -> int:
    return len(auth.token_requests("refresh_token"))


def _row(broker: Broker, user: str) -> dict[str, Any]:
    (row,) = broker.rows("SELECT * FROM credentials WHERE user_id = ?", (user,))
    return row


async def test_a_credential_near_expiry_is_refreshed_without_any_resolve(make_broker: BrokerFactory) -> None:
    broker = await make_broker(background_refresh=FAST)
    await broker.connect("alice")
    before = _row(broker, "alice")
    await asyncio.sleep(0.3)  # several ticks: a fresh 3600 s token is not due
    assert _refreshes(broker.auth) == 0
    broker.clock.advance(3600 - 200)  # 200 s left: inside the lead (at least 240 s of 300)
    await _until(lambda: _refreshes(broker.auth) == 1)
    await asyncio.sleep(0.3)  # and only once: the new token is not due
    assert _refreshes(broker.auth) == 1
    after = _row(broker, "alice")
    assert after["generation"] > before["generation"]
    assert after["expires_at"] > before["expires_at"] + 3000
    assert after["status"] == "connected"
    refresher = broker.app.refresher
    assert refresher is not None
    await _until(lambda: refresher.stats.count("done") == 1)
    assert refresher.stats.lag_seconds >= 0
    # Resolve now answers from the stored, refreshed credential, without another grant.
    resolved = await broker.resolve("alice")
    assert broker.auth.access_token_info(resolved.access_token)["user"] == "alice"
    assert _refreshes(broker.auth) == 1
    text = broker.app.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "credential_broker_background_refreshes_total", {"upstream": UPSTREAM, "outcome": "done"}
    )
    assert text == 1.0


async def test_a_needs_reauth_credential_is_never_refreshed(make_broker: BrokerFactory) -> None:
    broker = await make_broker(background_refresh=FAST)
    await broker.connect("alice")
    await broker.connect("bob")
    broker.query("UPDATE credentials SET status = 'needs_reauth' WHERE user_id = 'alice'")
    alice = _row(broker, "alice")
    broker.clock.advance(3600 - 100)
    await _until(lambda: _refreshes(broker.auth) == 1)  # bob's: ticks are running
    await asyncio.sleep(0.4)
    assert _refreshes(broker.auth) == 1
    assert _row(broker, "alice") == alice
    assert _row(broker, "bob")["generation"] > alice["generation"] - 10  # bob was written
    assert _row(broker, "bob")["status"] == "connected"


async def test_a_failing_upstream_is_retried_only_after_its_backoff(make_broker: BrokerFactory) -> None:
    broker = await make_broker(background_refresh=FAST)
    await broker.connect("alice")
    broker.auth.fail_next("503")
    broker.clock.advance(3600 - 100)
    await _until(lambda: _refreshes(broker.auth) == 1)
    refresher = broker.app.refresher
    assert refresher is not None
    await _until(lambda: refresher.stats.count("failed") == 1)
    await asyncio.sleep(0.5)  # ten ticks; the manual clock has not reached the retry time
    assert _refreshes(broker.auth) == 1
    row = _row(broker, "alice")
    assert row["status"] == "error" and row["failure_count"] == 1
    assert row["next_attempt_at"] > broker.clock.now()
    broker.clock.advance(row["next_attempt_at"] - broker.clock.now() + 0.01)
    await _until(lambda: _row(broker, "alice")["status"] == "connected")
    await _until(lambda: refresher.stats.count("done") == 1)
    assert _refreshes(broker.auth) == 2


async def test_keep_alive_refreshes_an_idle_credential(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    auth_server.access_ttl = None  # tokens without expiry: only the keep-alive can refresh them
    client = auth_server.new_client(redirect_uri="https://app.example/callback")
    upstream = {**upstream_doc(auth_server, client), "refresh_token_idle_seconds": 3600}
    broker = await make_broker(background_refresh=FAST, upstreams=[upstream], client=client)
    await broker.connect("alice")
    assert _row(broker, "alice")["expires_at"] is None
    broker.clock.advance(3000)  # idle, but not yet near the limit (lead at most 300 s)
    await asyncio.sleep(0.3)
    assert _refreshes(auth_server) == 0
    broker.clock.advance(500)  # 100 s before the provider would revoke the refresh token
    await _until(lambda: _refreshes(auth_server) == 1)
    await asyncio.sleep(0.3)
    assert _refreshes(auth_server) == 1
    assert _row(broker, "alice")["last_refresh_at"] >= broker.clock.now() - 1


async def test_two_processes_refresh_each_due_credential_exactly_once(broker: Broker, tmp_path: Path) -> None:
    auth = broker.auth
    assert auth.rotate_refresh_tokens and auth.revoke_grant_on_reuse  # a reuse would revoke
    users = [f"user{n}" for n in range(12)]
    auth.access_ttl = 4  # due 2 s after connecting (the lead is at most half the lifetime)
    for user in users:
        await broker.connect(user)
    auth.access_ttl = 3600  # refreshed tokens are not due again
    config = write_config(
        broker.document,
        tmp_path / "procs.yaml",
        background_refresh={"enabled": True, "ahead_seconds": 60, "interval_seconds": 0.1},
    )
    servers = [ServerProcess(config, tmp_path / f"server{n}.log") for n in range(2)]
    channels = [grpc.aio.insecure_channel(s.address, interceptors=[RequestHeader()]) for s in servers]
    try:
        assert all(pb_grpc.CredentialBrokerStub(c) for c in channels)
        await _until(lambda: _refreshes(auth) >= len(users), timeout=20)
        await asyncio.sleep(1.5)  # fifteen more ticks on each process
        presented = [r.form["refresh_token"][0] for r in auth.token_requests("refresh_token")]
        assert len(presented) == len(users)
        assert len(set(presented)) == len(users)  # no refresh token presented twice
        rows = broker.rows("SELECT user_id, status, expires_at FROM credentials")
        assert sorted(r["user_id"] for r in rows) == sorted(users)
        assert all(r["status"] == "connected" and r["expires_at"] > time.time() + 3000 for r in rows)
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            server.stop()


async def test_a_credential_refreshed_after_the_scan_is_not_refreshed_again(
    make_broker: BrokerFactory,
) -> None:
    """The row is re-read and the schedule asked again under the lease: a scan result that went
    stale (another process or a Refresh renewed it meanwhile) makes no second grant."""
    broker = await make_broker(background_refresh={**FAST, "interval_seconds": 3600})
    await broker.connect("alice")
    broker.clock.advance(3600 - 200)
    refresher = broker.app.refresher
    assert refresher is not None
    found = await refresher.scan(broker.clock.now())
    assert [row.user_id for row, _, _ in found] == ["alice"]
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert _refreshes(broker.auth) == 1
    ((row, upstream, _),) = found
    assert await refresher.refresh_one(row, upstream) == 0
    assert _refreshes(broker.auth) == 1
    assert refresher.stats.count("skipped") == 1 and refresher.stats.count("done") == 0


async def test_a_credential_without_a_refresh_token_is_left_out_of_later_scans(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    auth_server.issue_refresh_token = False
    broker = await make_broker(background_refresh=FAST)
    await broker.connect("alice")
    broker.clock.advance(3600 - 100)
    refresher = broker.app.refresher
    assert refresher is not None
    await _until(lambda: refresher.stats.count("skipped") >= 1)
    await _until(lambda: (_row(broker, "alice")["next_attempt_at"] or 0) > broker.clock.now() + 86400)
    assert await refresher.scan(broker.clock.now()) == []  # no longer read by each tick
    assert _refreshes(auth_server) == 0
    assert _row(broker, "alice")["status"] == "connected"
