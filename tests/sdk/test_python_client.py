"""The Python SDK (clients/python) against a real broker and the loopback authorization server:
every RPC through both clients, typed errors with their authorization URLs, UNAVAILABLE retried
within the deadline (and across a broker restart), nothing else retried, no token in any text."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from credential_broker_client import (
    AsyncBrokerClient,
    BrokerClient,
    BrokerError,
    CallerNotPermitted,
    CallerUnauthenticated,
    Credential,
    FlowNotFound,
    InsufficientScope,
    InvalidArgument,
    NotConnected,
    PermissionDenied,
    ReconnectRequired,
    Unavailable,
    UnknownUpstream,
)
from credential_broker_client._common import resolve_target

from broker.callers import token_hash
from tests import leakcheck
from tests.authserver import AuthServer
from tests.brokerproc import write_config
from tests.conftest import REDIRECT_URI, UPSTREAM, Broker, BrokerFactory, upstream_doc
from tests.ecosystem.conftest import closed_tcp_target
from tests.live import free_port

from .conftest import PatientServerProcess, connect, connect_async, resolve_count, socket_target, target

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current() -> None:
    """clients/python's own stubs are what gen_stubs.py makes from proto/ now."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "clients/python/gen_stubs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"regenerate with clients/python/gen_stubs.py:\n{done.stdout}{done.stderr}"


def test_the_sdk_runs_without_datetime_utc() -> None:
    """requires-python is >=3.10, where datetime has no UTC (3.11): import and read a time with
    it removed, as on 3.10."""
    script = """
import datetime
del datetime.UTC
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2 as pb
from credential_broker_client.models import credential
answer = pb.ResolveResponse(access_token="t")
answer.expires_at.seconds = 1700000000
print(credential(answer).expires_at.isoformat())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2023-11-14T22:13:20+00:00"


def test_target_comes_from_the_argument_then_the_environment_then_the_default() -> None:
    assert resolve_target("10.0.0.1:9", {"CREDENTIAL_BROKER_SOCKET": "unix:///x.sock"}) == "10.0.0.1:9"
    assert resolve_target(None, {"CREDENTIAL_BROKER_SOCKET": "unix:///run/b.sock"}) == "unix:///run/b.sock"
    assert resolve_target(None, {"CREDENTIAL_BROKER_SOCKET": "/run/b.sock"}) == "unix:///run/b.sock"
    assert resolve_target(None, {}) == "127.0.0.1:50051"


def _every_rpc(client: BrokerClient, auth: AuthServer) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    info = connect(client, auth, "alice")
    seen["complete"] = info
    credential = client.resolve("alice", UPSTREAM, min_valid_seconds=120)
    seen["resolve"] = credential
    seen["refresh"] = client.refresh("alice", UPSTREAM)
    seen["resolved_after_refresh"] = client.resolve("alice", UPSTREAM)
    seen["list"] = client.list_connections("alice")
    started = client.build_authorization_url("bob", UPSTREAM)
    denied = auth.authorize(started.authorization_url, "bob", deny=True)
    client.deny(denied["state"], denied["error"])
    with pytest.raises(FlowNotFound):  # the denied flow is gone
        client.complete(started.state, "code-x", "bob")
    seen["disconnect"] = client.disconnect("alice", UPSTREAM)
    stream = client.watch("alice", after_sequence=0)
    seen["events"] = [next(stream) for _ in range(3)]
    stream.close()
    return seen


def _check_every_rpc(seen: dict[str, Any], auth: AuthServer) -> None:
    assert seen["complete"].user_id == "alice" and seen["complete"].upstream == UPSTREAM
    assert seen["complete"].scopes == ("repo", "read:user")
    credential: Credential = seen["resolve"]
    assert credential.access_token in auth.issued
    assert credential.header_name == "Authorization"
    assert credential.header_value == f"Bearer {credential.access_token}"
    assert credential.token_type == "Bearer" and credential.expires_at is not None
    assert credential.access_token not in repr(credential)
    assert seen["refresh"].obtained_via == "connect_flow"
    assert seen["resolved_after_refresh"].access_token != credential.access_token
    [connection] = [c for c in seen["list"] if c.upstream == UPSTREAM]
    assert connection.status == "connected" and connection.mode == "oauth_connect"
    assert seen["disconnect"].deleted is True
    assert [e.kind for e in seen["events"]] == ["CONNECTED", "REFRESHED", "DISCONNECTED"]
    assert all(e.user_id == "alice" and e.upstream == UPSTREAM for e in seen["events"])
    assert seen["events"][0].sequence < seen["events"][1].sequence < seen["events"][2].sequence


async def test_every_rpc_through_the_sync_client(broker: Broker) -> None:
    with BrokerClient(target(broker)) as client:
        seen = await asyncio.to_thread(_every_rpc, client, broker.auth)
    _check_every_rpc(seen, broker.auth)


async def test_every_rpc_through_the_async_client(broker: Broker) -> None:
    auth = broker.auth
    async with AsyncBrokerClient(socket_target(broker)) as client:
        await connect_async(client, auth, "alice")
        credential = await client.resolve("alice", UPSTREAM)
        assert credential.access_token in auth.issued
        refreshed = await client.refresh("alice", UPSTREAM)
        assert refreshed.upstream == UPSTREAM
        assert (await client.resolve("alice", UPSTREAM)).access_token != credential.access_token
        [connection] = await client.list_connections("alice")
        assert connection.status == "connected"
        started = await client.build_authorization_url("bob", UPSTREAM)
        denied = await asyncio.to_thread(auth.authorize, started.authorization_url, "bob", deny=True)
        await client.deny(denied["state"], denied["error"])
        assert (await client.disconnect("alice", UPSTREAM)).deleted
        events = []
        async for event in client.watch("alice", [UPSTREAM], after_sequence=0):
            events.append(event.kind)
            if len(events) == 3:
                break
        assert events == ["CONNECTED", "REFRESHED", "DISCONNECTED"]


async def test_disconnect_all_through_both_clients(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    """DisconnectAll revokes and deletes every connection of the user, one result per upstream."""
    client_doc = auth_server.new_client(redirect_uri=REDIRECT_URI)
    other = upstream_doc(auth_server, client_doc) | {"name": "other", "url": "https://other.test"}
    broker = await make_broker(client=client_doc, upstreams=[upstream_doc(auth_server, client_doc), other])
    with BrokerClient(target(broker)) as client:
        for upstream in (UPSTREAM, "other"):
            await asyncio.to_thread(connect, client, broker.auth, "carol", upstream)
        results = await asyncio.to_thread(client.disconnect_all, "carol")
        assert sorted((r.upstream, r.deleted) for r in results) == [(UPSTREAM, True), ("other", True)]
        with pytest.raises(NotConnected):
            await asyncio.to_thread(client.resolve, "carol", "other")
    async with AsyncBrokerClient(target(broker)) as aclient:
        await connect_async(aclient, broker.auth, "dave")
        [result] = await aclient.disconnect_all("dave")
        assert result.upstream == UPSTREAM and result.deleted


async def test_connect_required_errors_carry_the_authorization_url(broker: Broker) -> None:
    with BrokerClient(target(broker)) as client:
        with pytest.raises(NotConnected) as missing:
            await asyncio.to_thread(client.resolve, "erin", UPSTREAM)
        assert missing.value.reason == "NOT_CONNECTED" and missing.value.upstream == UPSTREAM
        assert missing.value.authorization_url.startswith(broker.auth.authorization_endpoint + "?")
        assert missing.value.metadata["authorization_url"] == missing.value.authorization_url
        await asyncio.to_thread(connect, client, broker.auth, "erin")
        broker.auth.revoke_user("erin")
        with pytest.raises(ReconnectRequired) as dead:
            await asyncio.to_thread(client.refresh, "erin", UPSTREAM)
        assert dead.value.authorization_url.startswith(broker.auth.authorization_endpoint + "?")
    async with AsyncBrokerClient(target(broker)) as aclient:
        with pytest.raises(NotConnected) as amissing:
            await aclient.resolve("frank", UPSTREAM)
        assert amissing.value.authorization_url.startswith(broker.auth.authorization_endpoint + "?")


async def test_insufficient_scope_names_the_missing_scopes_and_a_url_for_all(broker: Broker) -> None:
    with BrokerClient(target(broker)) as client:
        await asyncio.to_thread(connect, client, broker.auth, "gina")
        answer = await asyncio.to_thread(client.resolve, "gina", UPSTREAM, required_scopes=["repo"])
        assert "repo" in answer.scopes
        with pytest.raises(InsufficientScope) as short:
            await asyncio.to_thread(client.resolve, "gina", UPSTREAM, required_scopes=["repo", "admin:org"])
    assert short.value.missing_scopes == ("admin:org",)
    assert short.value.authorization_url.startswith(broker.auth.authorization_endpoint + "?")
    assert "admin%3Aorg" in short.value.authorization_url


async def test_other_errors_are_typed(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    tokens = {"web": os.urandom(24).hex(), "reader": os.urandom(24).hex()}
    callers = [
        {"name": "web", "token_sha256": token_hash(tokens["web"])},
        {"name": "reader", "token_sha256": token_hash(tokens["reader"]), "methods": ["ListConnections"]},
    ]
    broker = await make_broker(callers=callers)
    with BrokerClient(target(broker), caller_token=tokens["web"]) as client:
        with pytest.raises(UnknownUpstream):
            await asyncio.to_thread(client.resolve, "alice", "nope")
        with pytest.raises(InvalidArgument) as bad:
            await asyncio.to_thread(client.resolve, "alice", "bad upstream!")
        assert bad.value.reason == "INVALID_ARGUMENT"
        with pytest.raises(FlowNotFound):
            await asyncio.to_thread(client.complete, "A" * 43, "code", "alice")
        started = await asyncio.to_thread(client.build_authorization_url, "alice", UPSTREAM)
        callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
        with pytest.raises(PermissionDenied):  # someone else completing alice's flow
            await asyncio.to_thread(client.complete, callback["state"], callback["code"], "mallory")
    with (
        BrokerClient(target(broker), caller_token="not-a-caller-token") as stranger,
        pytest.raises(CallerUnauthenticated),
    ):
        await asyncio.to_thread(stranger.list_connections, "alice")
    with BrokerClient(target(broker), caller_token=tokens["reader"]) as reader:
        assert await asyncio.to_thread(reader.list_connections, "alice")
        with pytest.raises(CallerNotPermitted):
            await asyncio.to_thread(reader.resolve, "alice", UPSTREAM)
        assert "not-a-caller-token" not in repr(reader) and tokens["reader"] not in repr(reader)


async def test_only_unavailable_is_retried(broker: Broker) -> None:
    """A refused call is made once; an unreachable broker is retried until the deadline."""
    with BrokerClient(target(broker)) as client, pytest.raises(NotConnected):
        await asyncio.to_thread(client.resolve, "henry", UPSTREAM, timeout=5)
    assert resolve_count(broker, "henry") == 1
    attempts: list[float] = []
    handler = _Capture(attempts)
    logger = logging.getLogger("credential_broker_client")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with BrokerClient(closed_tcp_target()) as nowhere:
            start = time.monotonic()
            with pytest.raises(Unavailable) as down:
                await asyncio.to_thread(nowhere.resolve, "henry", UPSTREAM, timeout=1.5)
            elapsed = time.monotonic() - start
    finally:
        logger.removeHandler(handler)
    assert down.value.reason == "UNAVAILABLE"
    assert len(attempts) >= 2, "UNAVAILABLE was not retried"
    assert 0.3 < elapsed < 1.5 + 1.0, elapsed


class _Capture(logging.Handler):
    def __init__(self, into: list[Any]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@pytest.mark.timeout(90)
async def test_unavailable_is_retried_while_the_broker_restarts(broker: Broker, tmp_path: Path) -> None:
    """The broker process goes away and comes back on the same port: the call in progress
    (deadline 60 s) keeps retrying and then succeeds."""
    port = free_port()
    config = write_config(broker.document, tmp_path / "restart.yaml", listen=[f"127.0.0.1:{port}"])
    first = PatientServerProcess(config, tmp_path / "first.log")
    try:
        with BrokerClient(first.address) as client:
            await asyncio.to_thread(connect, client, broker.auth, "ivan")
            before = await asyncio.to_thread(client.resolve, "ivan", UPSTREAM)
            first.stop()
            restarted: list[PatientServerProcess] = []

            def restart() -> None:
                time.sleep(1.0)
                restarted.append(PatientServerProcess(config, tmp_path / "second.log"))

            thread = threading.Thread(target=restart)
            thread.start()
            start = time.monotonic()
            try:
                after = await asyncio.to_thread(client.resolve, "ivan", UPSTREAM, timeout=60)
            finally:
                await asyncio.to_thread(thread.join)
            assert time.monotonic() - start >= 0.9
            assert after.access_token == before.access_token
    finally:
        first.stop()
        for server in locals().get("restarted", []):
            server.stop()


@pytest.mark.timeout(90)
async def test_the_async_client_retries_unavailable_while_the_broker_restarts(
    broker: Broker, tmp_path: Path
) -> None:
    """The same with AsyncBrokerClient: its retry sleeps on the event loop until the deadline."""
    port = free_port()
    config = write_config(broker.document, tmp_path / "restart.yaml", listen=[f"127.0.0.1:{port}"])
    first = PatientServerProcess(config, tmp_path / "first.log")
    restarted: list[PatientServerProcess] = []
    try:
        with BrokerClient(first.address) as client:
            await asyncio.to_thread(connect, client, broker.auth, "iris")
        async with AsyncBrokerClient(first.address) as aio:
            before = await aio.resolve("iris", UPSTREAM)
            first.stop()

            async def restart() -> None:
                await asyncio.sleep(1.0)
                restarted.append(
                    await asyncio.to_thread(PatientServerProcess, config, tmp_path / "second.log")
                )

            start = time.monotonic()
            restarting = asyncio.ensure_future(restart())
            try:
                after = await aio.resolve("iris", UPSTREAM, timeout=60)
            finally:
                await restarting
            assert time.monotonic() - start >= 0.9
            assert after.access_token == before.access_token
    finally:
        first.stop()
        for server in restarted:
            server.stop()


async def test_no_token_in_sdk_logs_exceptions_or_reprs(broker: Broker) -> None:
    texts: list[str] = []
    handler = _Capture(texts)
    logger = logging.getLogger("credential_broker_client")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    caller_token = os.urandom(16).hex()
    try:
        with BrokerClient(target(broker), caller_token=caller_token, cache=True) as client:
            assert await asyncio.to_thread(client.wait_cache_live)
            info = await asyncio.to_thread(connect, client, broker.auth, "judy")
            credential = await asyncio.to_thread(client.resolve, "judy", UPSTREAM)
            texts += [repr(client), repr(info), repr(credential), str(credential)]
            for call in (
                lambda: client.resolve("judy", "nope"),
                lambda: client.resolve("nobody", UPSTREAM),
                lambda: client.complete("B" * 43, credential.access_token, "judy"),
                lambda: client.resolve(
                    "judy", UPSTREAM, subject_token=credential.access_token, min_valid_seconds=10**6
                ),
            ):
                try:
                    await asyncio.to_thread(call)
                except BrokerError as exc:
                    texts += [str(exc), repr(exc), exc.message]
            started = await asyncio.to_thread(client.build_authorization_url, "judy", UPSTREAM)
            texts.append(repr(started))
            await asyncio.to_thread(client.refresh, "judy", UPSTREAM)
            with BrokerClient(closed_tcp_target()) as nowhere:
                try:
                    await asyncio.to_thread(nowhere.resolve, "judy", UPSTREAM, timeout=0.5)
                except BrokerError as exc:
                    texts += [str(exc), repr(exc)]
    finally:
        logger.removeHandler(handler)
    secrets = [*broker.auth.issued, caller_token, started.state]
    assert len(texts) > 8
    for text in texts:
        leakcheck.observe_text(text, "sdk")
        for secret in secrets:
            assert secret not in text, f"a secret in SDK text: {text[:80]!r}"
