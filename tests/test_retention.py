"""Retention: the reaper deletes credentials that have needed reconnecting for longer than
``retention.needs_reauth_seconds`` and connection events older than ``events.retention_seconds``
(or beyond ``events.max_events``), each deletion audited; ``retention.dry_run`` deletes nothing
and only says what would go. A watcher resuming below what retention deleted is told to
resynchronise (OUT_OF_RANGE, WATCH_RESYNC_REQUIRED) instead of silently missing events.

Real broker and store (both backends), the test authorization server revokes grants for real;
the clock is the only fake."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info

HEADER = (("x-credential-broker-request", "true"),)
HOUR = 3600


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _needs_reauth(broker: Broker, user: str) -> None:
    broker.auth.revoke_user(user)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
    assert error_info(refused.value).reason == "RECONNECT_REQUIRED"


async def _world(make_broker: BrokerFactory, **settings: Any) -> Broker:
    """alice: needs_reauth for 2 hours; carol: needs_reauth for 10 minutes; bob and dave
    connected (dave just now). Events: everything before the last 10 minutes is old."""
    broker = await make_broker(**settings)
    await broker.connect("alice")
    await broker.connect("bob")
    await _needs_reauth(broker, "alice")
    broker.clock.advance(2 * HOUR - 600)
    await broker.connect("carol")
    await _needs_reauth(broker, "carol")
    broker.clock.advance(600)
    await broker.connect("dave")
    return broker


def _credentials(broker: Broker) -> list[str]:
    return sorted(str(user) for (user,) in broker.query("SELECT user_id FROM credentials"))


def _events(broker: Broker) -> list[tuple[int, str, str, float]]:
    rows = broker.query("SELECT seq, user_id, kind, at FROM connection_events ORDER BY seq")
    return [(int(s), str(u), str(k), float(a)) for s, u, k, a in rows]


def _retention_audit(broker: Broker) -> list[Any]:
    return [e for e in broker.extra["audit"].events if e.action == "retention"]


SETTINGS = {
    "retention": {"needs_reauth_seconds": HOUR},
    "events": {"retention_seconds": 900, "max_events": 1000},
}


async def test_a_dry_run_deletes_nothing_and_says_what_would_go(make_broker: BrokerFactory) -> None:
    settings = {**SETTINGS, "retention": {**SETTINGS["retention"], "dry_run": True}}
    broker = await _world(make_broker, **settings)
    before_credentials, before_events = _credentials(broker), _events(broker)
    reaper = broker.app.reaper
    assert reaper is not None

    report = await asyncio.to_thread(reaper.reap_once)

    assert report.dry_run
    assert report.credentials == [("alice", UPSTREAM)]
    old = [e for e in before_events if e[3] <= broker.clock.now() - 900]
    assert old and report.events == len(old)
    assert _credentials(broker) == before_credentials == ["alice", "bob", "carol", "dave"]
    assert _events(broker) == before_events
    assert broker.app.store.events_trimmed_through() == 0
    audited = _retention_audit(broker)
    assert [(e.user, e.upstream, e.detail["kind"], e.detail["dry_run"]) for e in audited] == [
        ("alice", UPSTREAM, "credential", "true"),
        ("", "", "events", "true"),
    ]
    assert audited[1].detail["count"] == str(len(old))


async def test_a_real_run_deletes_exactly_the_expired_rows(make_broker: BrokerFactory) -> None:
    broker = await _world(make_broker, **SETTINGS)
    cutoff = broker.clock.now() - 900
    before = _events(broker)
    old, kept = [e for e in before if e[3] <= cutoff], [e for e in before if e[3] > cutoff]
    assert old and kept
    reaper = broker.app.reaper
    assert reaper is not None

    report = await asyncio.to_thread(reaper.reap_once)

    assert not report.dry_run
    assert report.credentials == [("alice", UPSTREAM)]
    assert _credentials(broker) == ["bob", "carol", "dave"]
    after = _events(broker)
    # The old events are gone; the recent ones stay, and alice's removal is announced.
    assert after[: len(kept)] == kept
    assert [(u, k) for _, u, k, _ in after[len(kept) :]] == [("alice", "disconnected")]
    assert report.events == len(old)
    assert broker.app.store.events_trimmed_through() == old[-1][0]
    audited = _retention_audit(broker)
    assert [(e.user, e.upstream, e.detail["kind"], e.detail["dry_run"]) for e in audited] == [
        ("alice", UPSTREAM, "credential", "false"),
        ("", "", "events", "false"),
    ]
    # carol, bob and dave still work as before; alice is asked to connect again.
    assert (await broker.resolve("bob")).access_token
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await broker.resolve("alice")
    assert error_info(gone.value).reason == "NOT_CONNECTED"
    # A second run finds nothing more.
    again = await asyncio.to_thread(reaper.reap_once)
    assert (again.credentials, again.events) == ([], 0)


async def test_max_events_keeps_only_the_newest(make_broker: BrokerFactory) -> None:
    broker = await make_broker(events={"retention_seconds": 7 * 86400, "max_events": 3})
    for user in ("u1", "u2", "u3", "u4", "u5"):
        await broker.connect(user)
    before = _events(broker)
    reaper = broker.app.reaper
    assert reaper is not None
    report = await asyncio.to_thread(reaper.reap_once)
    assert report.events == 2
    assert _events(broker) == before[2:]


async def test_a_reconnect_keeps_the_credential_from_the_reaper(make_broker: BrokerFactory) -> None:
    broker = await make_broker(**SETTINGS)
    await broker.connect("alice")
    await _needs_reauth(broker, "alice")
    broker.clock.advance(2 * HOUR)
    await broker.connect("alice")  # reconnected: no longer needs_reauth
    reaper = broker.app.reaper
    assert reaper is not None
    report = await asyncio.to_thread(reaper.reap_once)
    assert report.credentials == []
    assert (await broker.resolve("alice")).access_token


async def test_a_watcher_resuming_below_the_retained_window_must_resynchronise(
    make_broker: BrokerFactory,
) -> None:
    broker = await _world(make_broker, **SETTINGS)
    reaper = broker.app.reaper
    assert reaper is not None
    await asyncio.to_thread(reaper.reap_once)
    trimmed = broker.app.store.events_trimmed_through()
    assert trimmed > 0
    for after in (0, trimmed - 1):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in broker.stub.WatchConnections(
                pb.WatchConnectionsRequest(after_sequence=after), metadata=HEADER
            ):
                pass
        assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_info(refused.value).reason == "WATCH_RESYNC_REQUIRED"
        assert "ListConnections" in (refused.value.details() or "")
    # From the mark on, nothing was deleted: the watcher gets every retained event.
    retained = _events(broker)
    call = broker.stub.WatchConnections(pb.WatchConnectionsRequest(after_sequence=trimmed), metadata=HEADER)
    seen = []
    async for response in call:
        seen.append(response.event.sequence)
        if len(seen) == len(retained):
            break
    call.cancel()
    assert seen == [s for s, *_ in retained]


async def test_bad_retention_settings_are_refused_at_start(make_broker: BrokerFactory) -> None:
    from broker.config import load_config
    from broker.errors import ConfigError

    broker = await make_broker()
    for section, value, name in [
        ("retention", {"needs_reauth_seconds": -1}, "retention.needs_reauth_seconds"),
        ("retention", {"dry_run": "maybe"}, "retention.dry_run"),
        ("retention", {"needs_reauth_secs": 5}, "retention.needs_reauth_secs"),
        ("events", {"retention_seconds": 0}, "events.retention_seconds"),
        ("events", {"max_events": 0}, "events.max_events"),
    ]:
        with pytest.raises(ConfigError) as bad:
            load_config({**broker.document, section: value}, environ={}, base_dir=broker.tmp)
        assert name in str(bad.value)


async def test_expired_flows_are_purged_and_audited(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    await broker.start_flow("alice")
    broker.clock.advance(601)  # past flow_ttl_seconds
    purger = broker.app.flow_purger
    assert purger is not None
    assert await asyncio.to_thread(purger.purge_once) == 1
    (record,) = _retention_audit(broker)
    assert record.detail == {"kind": "flows", "count": "1"} and record.reason == "flows_expired"
    assert broker.query("SELECT * FROM pending_flows") == []
