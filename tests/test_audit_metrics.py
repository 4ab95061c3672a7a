"""The audit trail (event sequence, request ids, no secrets, JSON lines, rotation) and the
Prometheus endpoint, scraped over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from pathlib import Path

import pytest

from broker import audit
from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.audit import AuditEvent, RotatingFileSink
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, upstream_doc


async def test_full_lifecycle_audit_sequence(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    broker = await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client, revocation_endpoint=auth_server.revocation_endpoint)],
    )
    rid = [("x-request-id", "req-123")]
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM), metadata=rid
    )
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice", iss=callback["iss"])
    )
    first = await broker.resolve("alice")
    broker.clock.advance(3600)
    second = await broker.resolve("alice")  # refreshes first
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    await broker.stub.Disconnect(pb.DisconnectRequest(user_id="alice", upstream=UPSTREAM))
    events: list[AuditEvent] = broker.extra["audit"].events
    assert [(e.action, e.outcome, e.method) for e in events] == [
        ("connect", "success", "BuildAuthorizationURL"),
        ("acquire", "success", "Complete"),
        ("inject", "success", "Resolve"),
        ("refresh", "success", "Resolve"),
        ("inject", "success", "Resolve"),
        ("refresh", "success", "Refresh"),
        ("disconnect", "success", "Disconnect"),
    ]
    assert all(e.user == "alice" and e.upstream == UPSTREAM for e in events)
    assert all(e.caller == "anonymous" for e in events)
    assert events[0].request_id == "req-123"
    generated = {e.request_id for e in events[1:]}
    assert len(generated) == 5 and "" not in generated  # one per call; the inner refresh shares it
    assert events[2].request_id != events[4].request_id and events[3].request_id == events[4].request_id
    assert events[-1].detail == {"deleted": "true", "refresh_token": "revoked", "access_token": "revoked"}
    text = "\n".join(e.to_json() for e in events)
    for secret in [
        first.access_token,
        second.access_token,
        started.state,
        callback["code"],
        *auth_server.issued,
    ]:
        assert secret not in text
    assert "authorization_url" not in text and "http" not in text
    line = json.loads(events[0].to_json())
    assert set(line) == {
        "action",
        "outcome",
        "user",
        "upstream",
        "method",
        "caller",
        "reason",
        "request_id",
        "time",
    }
    assert line["time"].endswith("Z")


async def test_failures_are_audited_with_their_error_code(broker: Broker) -> None:
    with contextlib.suppress(Exception):
        await broker.resolve("alice")
    await broker.connect("alice")
    broker.clock.advance(3600)
    broker.auth.fail_next("503")
    with contextlib.suppress(Exception):
        await broker.resolve("alice")
    events = [(e.action, e.outcome, e.reason) for e in broker.extra["audit"].events]
    assert events[0] == ("inject", "failure", "NOT_CONNECTED")
    assert ("refresh", "failure", "UPSTREAM_UNAVAILABLE") in events
    assert events[-1] == ("inject", "failure", "UPSTREAM_UNAVAILABLE")


def test_rotating_file_sink_writes_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.log"
    sink = RotatingFileSink(path, max_bytes=1024, backup_count=2)
    for n in range(40):
        sink.emit(AuditEvent("inject", "success", user=f"user{n}", upstream="gh", time=1.5))
    sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines and lines[-1]["user"] == "user39" and lines[0]["time"] == "1970-01-01T00:00:01.500Z"
    assert (tmp_path / "audit" / "audit.log.1").exists() and not (tmp_path / "audit" / "audit.log.3").exists()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # Lines are whole across rotations: every event is in exactly one file, in order.
    users = [
        json.loads(line)["user"]
        for name in ("audit.log.2", "audit.log.1", "audit.log")
        for line in (tmp_path / "audit" / name).read_text().splitlines()
    ]
    assert users == [f"user{n}" for n in range(40 - len(users), 40)]


async def test_audit_file_output_from_config(make_broker: BrokerFactory, tmp_path: Path) -> None:
    from broker.config import load_config

    config = load_config(
        {"keyring": {"file": "k.json"}, "audit": {"output": "file", "path": "logs/audit.jsonl"}},
        environ={},
        base_dir=tmp_path,
    )
    assert config.audit.path == tmp_path / "logs" / "audit.jsonl"


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def _value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix + " ") or (line.startswith(prefix) and prefix.endswith("}")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in the scrape")


async def test_metrics_endpoint_is_scraped_over_http(make_broker: BrokerFactory) -> None:
    broker = await make_broker(metrics={"listen": "127.0.0.1:0"})
    assert broker.app.metrics_address is not None
    await broker.connect("alice")
    await broker.connect("bob")
    await broker.resolve("alice")
    broker.clock.advance(3600)
    broker.auth.fail_next("timeout", seconds=0.3)
    await asyncio.gather(*(broker.resolve("alice") for _ in range(5)))
    broker.auth.revoke_user("bob")
    with contextlib.suppress(Exception):
        await broker.resolve("bob")
    text = await asyncio.to_thread(_scrape, broker.app.metrics_address)
    assert _value(text, 'credential_broker_rpc_requests_total{code="OK",method="Resolve"}') == 6
    assert (
        _value(text, 'credential_broker_rpc_requests_total{code="FAILED_PRECONDITION",method="Resolve"}') == 1
    )
    assert 'credential_broker_rpc_duration_seconds_bucket{code="OK",le="0.5",method="Complete"}' in text
    assert (
        _value(
            text,
            'credential_broker_token_requests_total{grant="authorization_code",outcome="ok",upstream="gh"}',
        )
        == 2
    )
    assert (
        _value(
            text, 'credential_broker_token_requests_total{grant="refresh_token",outcome="ok",upstream="gh"}'
        )
        == 1
    )
    assert (
        _value(
            text,
            'credential_broker_token_requests_total{grant="refresh_token",outcome="rejected",upstream="gh"}',
        )
        == 1
    )
    assert _value(text, "credential_broker_singleflight_coalesced_total") == 4
    assert (
        _value(text, 'credential_broker_refresh_failures_total{error="RECONNECT_REQUIRED",upstream="gh"}')
        == 1
    )
    assert _value(text, 'credential_broker_credentials{status="connected"}') == 1
    assert _value(text, 'credential_broker_credentials{status="needs_reauth"}') == 1
    assert 'credential_broker_store_operation_seconds_count{operation="save_credential"}' in text
    for secret in broker.auth.issued:
        assert secret not in text
    assert "alice" not in text


async def test_metrics_are_off_by_default(broker: Broker) -> None:
    assert broker.app.metrics_address is None


@pytest.mark.parametrize("text", ["plain", 'quo"te', "back\\slash", "ünïcode", "new\nline", "</script>", ""])
def test_audit_lines_are_json_whatever_the_field_holds(text: str) -> None:
    event = AuditEvent(
        "inject", "failure", user=text, upstream=text, reason=text, detail={"k": text}, time=2.25
    )
    assert json.loads(event.to_json()) == {
        "action": "inject",
        "outcome": "failure",
        "user": text,
        "upstream": text,
        "method": "",
        "caller": "",
        "reason": text,
        "request_id": "",
        "time": "1970-01-01T00:00:02.250Z",
        "detail": {"k": text},
    }


def test_audit_lines_keep_each_events_own_fields_while_the_quoted_prefix_is_reused() -> None:
    """The quoted part of a line is kept by (action, outcome, user, upstream, method, caller,
    reason): events that differ in any of them, interleaved, each keep their own values, and
    the kept prefixes stay bounded however many users pass."""
    combos = [
        (action, outcome, user, upstream, method, caller, reason)
        for action in ("inject", "refresh")
        for outcome in ("success", "failure")
        for user in ("alice", "bob")
        for upstream in ("github", "gitlab")
        for method in ("Resolve", "Refresh")
        for caller in ("svc-a", "svc-b")
        for reason in ("", "NOT_CONNECTED")
    ]
    for round_ in range(3):
        for n, (action, outcome, user, upstream, method, caller, reason) in enumerate(combos):
            rid = f"rid-{round_}-{n}"
            line = AuditEvent(action, outcome, user, upstream, method, caller, reason, rid, 1.5).to_json()
            assert json.loads(line) == {
                "action": action,
                "outcome": outcome,
                "user": user,
                "upstream": upstream,
                "method": method,
                "caller": caller,
                "reason": reason,
                "request_id": rid,
                "time": "1970-01-01T00:00:01.500Z",
            }
    for n in range(audit.MAX_PREFIXES + 10):
        line = AuditEvent("inject", "success", f"user-{n}", "github", request_id=str(n)).to_json()
        assert json.loads(line)["user"] == f"user-{n}"
    assert 0 < len(audit._PREFIXES) <= audit.MAX_PREFIXES
