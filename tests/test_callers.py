"""Caller trust through a real server: the SSRF header, caller tokens, mutual TLS, per-caller
rules, unix socket modes and ownership, and the loopback-unless-TLS rule."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.app import build_app
from broker.callers import token_hash
from broker.config import load_config
from broker.errors import ConfigError
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc
from tests.pki import TestCA

HEADER = ("x-credential-broker-request", "true")
LIST = pb.ListConnectionsRequest(user_id="alice")


def _raw_stub(address: str, **kw: Any) -> tuple[grpc.aio.Channel, pb_grpc.CredentialBrokerStub]:
    channel = grpc.aio.insecure_channel(address, **kw)
    return channel, pb_grpc.CredentialBrokerStub(channel)


async def _fails(call: Any, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert error_info(info.value).reason == reason


async def test_tcp_call_without_the_request_header_is_unauthenticated(broker: Broker) -> None:
    channel, stub = _raw_stub(broker.app.server.addresses[0])
    async with channel:
        await _fails(stub.ListConnections(LIST), grpc.StatusCode.UNAUTHENTICATED, "MISSING_REQUEST_HEADER")
        await _fails(
            stub.ListConnections(LIST, metadata=[("x-credential-broker-request", "false")]),
            grpc.StatusCode.UNAUTHENTICATED,
            "MISSING_REQUEST_HEADER",
        )
        assert (await stub.ListConnections(LIST, metadata=[HEADER])).connections
        # The health service never needs it (kubelet probes cannot send metadata).
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    events = [(e.action, e.outcome, e.reason) for e in broker.extra["audit"].events]
    assert events == [
        ("policy_denial", "denied", "MISSING_REQUEST_HEADER"),
        ("policy_denial", "denied", "MISSING_REQUEST_HEADER"),
        ("list", "success", ""),
    ]


async def test_unix_socket_needs_no_header_by_default_but_always_means_always(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker()
    unix = broker.app.server.addresses[1]
    channel, stub = _raw_stub(unix)
    async with channel:
        assert (await stub.ListConnections(LIST)).connections
    strict = await make_broker(require_request_header="always", listen=[f"unix://{broker.tmp}/strict.sock"])
    channel, stub = _raw_stub(strict.app.server.addresses[0])
    async with channel:
        await _fails(stub.ListConnections(LIST), grpc.StatusCode.UNAUTHENTICATED, "MISSING_REQUEST_HEADER")
        assert (await stub.ListConnections(LIST, metadata=[HEADER])).connections


async def test_health_listener_needs_nothing(make_broker: BrokerFactory) -> None:
    broker = await make_broker(health_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(broker.app.server.health_address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _callers(auth: AuthServer, tokens: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": "web", "token_sha256": token_hash(tokens["web"]), "upstreams": [UPSTREAM]},
        {
            "name": "reporter",
            "token_sha256": token_hash(tokens["reporter"]),
            "upstreams": ["other"],
            "methods": ["ListConnections", "Resolve"],
        },
    ]


async def _two_callers(make_broker: BrokerFactory, auth_server: AuthServer) -> tuple[Broker, dict[str, str]]:
    """A broker with two upstreams and the callers web and reporter, and their tokens."""
    tokens = {"web": os.urandom(24).hex(), "reporter": os.urandom(24).hex()}
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    other = upstream_doc(auth_server, client) | {"name": "other", "url": "https://other.test"}
    broker = await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client), other],
        callers=_callers(auth_server, tokens),
    )
    return broker, tokens


async def test_caller_tokens_and_rules(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    broker, tokens = await _two_callers(make_broker, auth_server)
    stub = broker.stub

    def bearer(token: str) -> list[tuple[str, str]]:
        return [("x-credential-broker-caller-token", token)]

    # No token, a wrong token: UNAUTHENTICATED.
    await _fails(stub.ListConnections(LIST), grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
    await _fails(
        stub.ListConnections(LIST, metadata=bearer("not-" + tokens["web"])),
        grpc.StatusCode.UNAUTHENTICATED,
        "CALLER_UNAUTHENTICATED",
    )
    # web may use gh only; its listing shows gh only.
    listed = await stub.ListConnections(LIST, metadata=bearer(tokens["web"]))
    assert [c.upstream for c in listed.connections] == [UPSTREAM]
    start = pb.BuildAuthorizationURLRequest(user_id="alice", upstream="other")
    await _fails(
        stub.BuildAuthorizationURL(start, metadata=bearer(tokens["web"])),
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_PERMITTED",
    )
    started = await stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM), metadata=bearer(tokens["web"])
    )
    assert started.state
    # reporter may call ListConnections and Resolve on "other" only.
    await _fails(
        stub.BuildAuthorizationURL(start, metadata=bearer(tokens["reporter"])),
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_PERMITTED",
    )
    await _fails(
        stub.Resolve(
            pb.ResolveRequest(user_id="alice", upstream=UPSTREAM), metadata=bearer(tokens["reporter"])
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_PERMITTED",
    )
    listed = await stub.ListConnections(LIST, metadata=bearer(tokens["reporter"]))
    assert [c.upstream for c in listed.connections] == ["other"]
    denials = [e for e in broker.extra["audit"].events if e.action == "policy_denial"]
    assert [e.reason for e in denials] == [
        "CALLER_UNAUTHENTICATED",
        "CALLER_UNAUTHENTICATED",
        "CALLER_NOT_PERMITTED",
        "CALLER_NOT_PERMITTED",
        "CALLER_NOT_PERMITTED",
    ]
    assert denials[2].caller == "web" and denials[2].upstream == "other"
    text = repr(broker.extra["audit"].events)
    assert tokens["web"] not in text and tokens["reporter"] not in text


async def test_concurrent_calls_of_different_callers_keep_their_own_metadata(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    """The interceptor hands each call the metadata gRPC decoded for it: 200 interleaved calls of
    two callers with different rights, and a request id per call, never see each other's."""
    broker, tokens = await _two_callers(make_broker, auth_server)
    web = [("x-credential-broker-caller-token", tokens["web"])]
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM), metadata=web
    )
    callback = await asyncio.to_thread(auth_server.authorize, started.authorization_url, "alice")
    await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice"), metadata=web
    )
    request = pb.ResolveRequest(user_id="alice", upstream=UPSTREAM)

    async def call(i: int) -> str:
        who = "web" if i % 2 == 0 else "reporter"
        metadata = [("x-credential-broker-caller-token", tokens[who]), ("x-request-id", f"call-{i}")]
        try:
            await broker.stub.Resolve(request, metadata=metadata)
            return f"{who}:ok"
        except grpc.aio.AioRpcError as exc:
            return f"{who}:{error_info(exc).reason}"

    answers = await asyncio.gather(*(call(i) for i in range(200)))
    assert answers == ["web:ok" if i % 2 == 0 else "reporter:CALLER_NOT_PERMITTED" for i in range(200)]
    seen = {
        (e.request_id, e.caller, e.action)
        for e in broker.extra["audit"].events
        if e.request_id.startswith("call-")
    }
    assert seen == {
        (f"call-{i}", "web" if i % 2 == 0 else "reporter", "inject" if i % 2 == 0 else "policy_denial")
        for i in range(200)
    }


def _tls_setup(tmp: Path) -> tuple[TestCA, dict[str, Any]]:
    ca = TestCA()
    server = ca.issue("broker", dns=["localhost"], ips=["127.0.0.1"], server=True)
    cert, key = server.write(tmp, "server")
    (tmp / "ca.crt").write_bytes(ca.pem)
    return ca, {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(tmp / "ca.crt")}


async def test_mutual_tls_identifies_callers_by_certificate(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    ca, tls = _tls_setup(tmp_path)
    allowed = "spiffe://example.org/ns/apps/sa/web"
    broker = await make_broker(
        listen=["127.0.0.1:0"],
        tls=tls,
        callers=[
            {"name": "web", "cert_identities": [allowed, "reporter.internal"], "methods": ["ListConnections"]}
        ],
    )
    address = broker.app.server.addresses[0]

    def channel_for(issued: Any) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(ca.pem, issued.key_pem, issued.cert_pem)
        return grpc.aio.secure_channel(
            address, creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )

    good = ca.issue("web", uris=[allowed], server=False)
    async with channel_for(good) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        assert (await stub.ListConnections(LIST, metadata=[HEADER])).connections
        await _fails(
            stub.Resolve(pb.ResolveRequest(user_id="alice", upstream=UPSTREAM), metadata=[HEADER]),
            grpc.StatusCode.PERMISSION_DENIED,
            "CALLER_NOT_PERMITTED",
        )
    by_dns = ca.issue("reporter", dns=["reporter.internal"], server=False)
    async with channel_for(by_dns) as channel:
        assert (
            await pb_grpc.CredentialBrokerStub(channel).ListConnections(LIST, metadata=[HEADER])
        ).connections
    outsider = ca.issue("other", uris=["spiffe://example.org/ns/apps/sa/other"], server=False)
    async with channel_for(outsider) as channel:
        await _fails(
            pb_grpc.CredentialBrokerStub(channel).ListConnections(LIST, metadata=[HEADER]),
            grpc.StatusCode.PERMISSION_DENIED,
            "CALLER_NOT_PERMITTED",
        )
    # A certificate from another CA, or none at all, fails the handshake.
    stranger = TestCA("stranger").issue("web", uris=[allowed], server=False)
    async with channel_for(stranger) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.CredentialBrokerStub(channel).ListConnections(LIST, metadata=[HEADER], timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(ca.pem)
    async with grpc.aio.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.CredentialBrokerStub(channel).ListConnections(LIST, metadata=[HEADER], timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_without_client_ca_serves_any_tls_client(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    # On loopback only: a non-loopback listener also needs caller authentication (tests/test_listeners.py).
    ca, tls = _tls_setup(tmp_path)
    del tls["client_ca_file"]
    broker = await make_broker(listen=["127.0.0.1:0"], tls=tls)
    port = broker.app.server.addresses[0].rpartition(":")[2]
    creds = grpc.ssl_channel_credentials(ca.pem)
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        await _fails(stub.ListConnections(LIST), grpc.StatusCode.UNAUTHENTICATED, "MISSING_REQUEST_HEADER")
        assert (await stub.ListConnections(LIST, metadata=[HEADER])).connections


def _document(tmp: Path, auth: AuthServer, **settings: Any) -> dict[str, Any]:
    client = auth.new_client()
    return {
        "store": {"path": str(tmp / "data" / "broker.db")},
        "keyring": {"file": str(tmp / "keyring.json")},
        "upstreams": [upstream_doc(auth, client)],
        **settings,
    }


def test_non_loopback_tcp_needs_tls(tmp_path: Path, auth_server: AuthServer) -> None:
    with pytest.raises(ConfigError, match=r"listen\[0\]: '0.0.0.0:50051' is not a loopback address; set tls"):
        load_config(_document(tmp_path, auth_server, listen=["0.0.0.0:50051"]), environ={}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"listen\[1\]"):
        load_config(
            _document(tmp_path, auth_server, listen=["127.0.0.1:1", {"address": "10.1.2.3:50051"}]),
            environ={},
            base_dir=tmp_path,
        )
    # The health-only listener is the one exception: plaintext on any address.
    config = load_config(
        _document(tmp_path, auth_server, health_listen="0.0.0.0:8081"), environ={}, base_dir=tmp_path
    )
    assert config.health_listen == "0.0.0.0:8081"
    with pytest.raises(ConfigError, match=r"listen\[0\].socket_mode: must be octal"):
        load_config(
            _document(tmp_path, auth_server, listen=[{"address": "unix:///tmp/x.sock", "socket_mode": "rw"}]),
            environ={},
            base_dir=tmp_path,
        )


async def test_socket_mode_is_configurable(make_broker: BrokerFactory, tmp_path: Path) -> None:
    broker = await make_broker(
        listen=[
            {"address": f"unix://{tmp_path}/private.sock", "socket_mode": "0600"},
            f"unix://{tmp_path}/default.sock",
        ]
    )
    assert stat.S_IMODE((tmp_path / "private.sock").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "default.sock").stat().st_mode) == 0o660
    assert broker.app.server.addresses[0].startswith("unix://")


def _bound_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


async def test_socket_path_owned_by_someone_else_is_refused(tmp_path: Path, auth_server: AuthServer) -> None:
    from broker.crypto import generate_keyring_file

    generate_keyring_file(tmp_path / "keyring.json")
    path = tmp_path / "taken.sock"
    _bound_socket(path)
    if os.geteuid() != 0:
        pytest.skip("needs root to give the socket to another user")
    os.chown(path, 65534, 65534)
    config = load_config(
        _document(tmp_path, auth_server, listen=[f"unix://{path}"]), environ={}, base_dir=tmp_path
    )
    with pytest.raises(ConfigError, match=r"listen\[0\]: .*taken.sock is owned by uid 65534"):
        build_app(config)
    assert path.exists()  # not replaced


async def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path: Path, auth_server: AuthServer) -> None:
    from broker.crypto import generate_keyring_file

    generate_keyring_file(tmp_path / "keyring.json")
    path = tmp_path / "important.txt"
    path.write_text("keep me")
    config = load_config(
        _document(tmp_path, auth_server, listen=[f"unix://{path}"]), environ={}, base_dir=tmp_path
    )
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        build_app(config)
    assert path.read_text() == "keep me"


async def test_caller_config_errors(tmp_path: Path, auth_server: AuthServer) -> None:
    cases = [
        ([{"name": "a"}], r"callers\[0\]: set token_sha256 or cert_identities"),
        ([{"name": "a", "token_sha256": "abc"}], r"callers\[0\].token_sha256"),
        ([{"name": "a", "cert_identities": ["spiffe://x/y"]}], r"needs tls.client_ca_file"),
        ([{"name": "a", "token_sha256": "0" * 64, "upstreams": ["nope"]}], r"'nope' is not a configured"),
    ]
    for callers, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(_document(tmp_path, auth_server, callers=callers), environ={}, base_dir=tmp_path)
    from broker.crypto import generate_keyring_file

    generate_keyring_file(tmp_path / "keyring.json")
    config = load_config(
        _document(
            tmp_path, auth_server, callers=[{"name": "a", "token_sha256": "0" * 64, "methods": ["Nope"]}]
        ),
        environ={},
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match=r"callers\[0\].methods: 'Nope' is not an RPC"):
        build_app(config)


async def test_reflection_needs_no_header_but_a_known_caller(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    """grpcurl's health check looks the service up by reflection first, without the header."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    token = secrets.token_urlsafe(24)
    broker = await make_broker(callers=[{"name": "web", "token_sha256": token_hash(token)}])
    channel, _ = _raw_stub(broker.app.server.addresses[0])
    async with channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.ServerReflectionInfo(iter([request])):
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(info.value).reason == "CALLER_UNAUTHENTICATED"
        known = [("x-credential-broker-caller-token", token)]
        answers = [a async for a in stub.ServerReflectionInfo(iter([request]), metadata=known)]
        names = {s.name for s in answers[0].list_services_response.service}
        assert "credentialbroker.v1.CredentialBroker" in names


async def test_a_guarded_call_leaves_no_reference_cycle_behind(broker: Broker) -> None:
    """Each call's task, its context and what they hold go as soon as the call ends: the
    interceptor's hand-over of the decoded metadata must not tie the task to itself (such a
    cycle waits for the garbage collector, which then walks every call's objects)."""
    request = pb.ListConnectionsRequest(user_id="alice")
    await broker.stub.ListConnections(request, metadata=[HEADER])
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            await broker.stub.ListConnections(request, metadata=[HEADER])
        gc.collect()
        left = sorted(
            {type(o).__name__ for o in gc.garbage if isinstance(o, asyncio.Task | contextvars.Context)}
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
