"""``http.ca_file``: trusting a private CA for outbound HTTPS.

A self-hosted authorization server or identity provider (Keycloak, ADFS, an internal IdP) often
has a certificate from a private CA. Without ``http.ca_file`` the broker trusts only the default
bundle, and a failure to verify must say "certificate not trusted", not look like a network
outage. With it, the CAs in the file are trusted in addition to the default ones, by every
outbound client: token requests (connect, refresh), RFC 8414 discovery and the identity
provider's discovery and JWKS. A missing or unusable file stops start-up with one line.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.config import load_config
from broker.errors import ConfigError
from broker.logs import LOGGER_NAME
from tests.authserver import AuthServer, ServerTLS
from tests.brokerproc import run_cli
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc
from tests.idp import IdentityProvider
from tests.pki import TestCA
from tests.test_identity import identity_doc

UNTRUSTED = "certificate not trusted"


class PrivatePKI:
    """A private CA, a server certificate for 127.0.0.1 it issued, and the CA's PEM file."""

    def __init__(self, tmp: Path) -> None:
        self.ca = TestCA("private-ca")
        self.cert, self.key = self.ca.issue("auth", dns=["localhost"], ips=["127.0.0.1"], server=True).write(
            tmp, "server"
        )
        self.ca_file = tmp / "private-ca.pem"
        self.ca_file.write_bytes(self.ca.pem)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca.pem.decode())


@pytest.fixture
def pki(tmp_path: Path) -> PrivatePKI:
    return PrivatePKI(tmp_path)


@pytest.fixture
def auth_server(pki: PrivatePKI) -> Iterator[AuthServer]:
    """This module's authorization server serves HTTPS with the private CA's certificate."""
    server = AuthServer(tls=ServerTLS(pki.server_context(), pki.client_context())).start()
    try:
        yield server
    finally:
        server.stop()
        assert server.internal_errors == []


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.getMessage()} {record.__dict__}")

    handler = Keep()
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger(LOGGER_NAME).removeHandler(handler)


async def _complete(broker: Broker) -> grpc.aio.AioRpcError:
    started = await broker.start_flow("alice")
    callback = broker.auth.authorize(started.authorization_url, "alice")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
        )
    return info.value


async def test_without_ca_file_a_private_ca_is_certificate_not_trusted(
    make_broker: BrokerFactory, auth_server: AuthServer, log_lines: list[str]
) -> None:
    assert auth_server.token_endpoint.startswith("https://")
    broker = await make_broker()
    error = await _complete(broker)
    # The gRPC answer is the one of the error table; its text says what is wrong.
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(error).reason == "UPSTREAM_UNAVAILABLE"
    assert UNTRUSTED in error.details()
    assert "http.ca_file" in error.details()
    assert "could not reach" not in error.details()
    assert "?" not in error.details() and "127.0.0.1" not in error.details()
    assert any(UNTRUSTED in line for line in log_lines)
    assert auth_server.token_requests() == []  # nothing was sent to an unverified server


async def test_with_ca_file_connect_resolve_and_refresh_work(
    make_broker: BrokerFactory, auth_server: AuthServer, pki: PrivatePKI
) -> None:
    broker = await make_broker(http={"ca_file": str(pki.ca_file)})
    await broker.connect("alice")
    first = await broker.resolve("alice")
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    second = await broker.resolve("alice")
    assert second.access_token and second.access_token != first.access_token
    assert len(auth_server.token_requests()) == 2


async def test_a_refresh_that_meets_an_untrusted_certificate_is_recorded_as_such(
    make_broker: BrokerFactory, auth_server: AuthServer, pki: PrivatePKI
) -> None:
    trusting = await make_broker(http={"ca_file": str(pki.ca_file)})
    await trusting.connect("alice")
    # Another broker on the same store and keyring, without the CA (a replica misconfigured).
    other = await make_broker(client=trusting.client)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await other.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert UNTRUSTED in info.value.details()
    (row,) = other.rows("SELECT status, last_error FROM credentials WHERE user_id = ?", ("alice",))
    assert row == {"status": "error", "last_error": "certificate_not_trusted"}
    assert len(auth_server.token_requests()) == 1  # the connect only


async def test_discovery_uses_the_ca_file(
    make_broker: BrokerFactory, auth_server: AuthServer, pki: PrivatePKI
) -> None:
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    doc = upstream_doc(auth_server, client, issuer=auth_server.issuer)
    for key in ("authorization_endpoint", "token_endpoint"):
        del doc["auth_broker"][key]
    with pytest.raises(ConfigError) as info:
        await make_broker(upstreams=[doc])
    assert UNTRUSTED in info.value.message
    broker = await make_broker(upstreams=[doc], http={"ca_file": str(pki.ca_file)}, client=client)
    started = await broker.start_flow("alice")
    callback = auth_server.authorize(started.authorization_url, "alice")
    await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice", iss=callback["iss"])
    )
    assert (await broker.resolve("alice")).access_token


class _JwksOverTLS(ThreadingHTTPServer):
    """Serves the loopback IdP's JWKS over HTTPS with the private CA's certificate."""

    daemon_threads = True

    def __init__(self, idp: IdentityProvider, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _JwksHandler)
        self.idp = idp
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def server_bind(self) -> None:
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client refusing the certificate fails the handshake: expected here."""


class _JwksHandler(BaseHTTPRequestHandler):
    server: _JwksOverTLS

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def setup(self) -> None:
        super().setup()
        self.connection.do_handshake()

    def do_GET(self) -> None:
        with urllib.request.urlopen(self.server.idp.jwks_uri, timeout=5) as answer:
            body = answer.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def jwks_over_tls(idp: IdentityProvider, pki: PrivatePKI) -> Iterator[str]:
    server = _JwksOverTLS(idp, pki.server_context())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/jwks"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)


async def _authorized(broker: Broker, token: str) -> str:
    try:
        await broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    except grpc.aio.AioRpcError as exc:
        return error_info(exc).reason
    return "OK"


async def test_the_identity_providers_keys_use_the_ca_file(
    make_broker: BrokerFactory,
    idp: IdentityProvider,
    jwks_over_tls: str,
    pki: PrivatePKI,
    log_lines: list[str],
) -> None:
    token = idp.sign(idp.claims("alice"), "rsa-1")
    identity = identity_doc(idp, jwks_uri=jwks_over_tls)
    untrusting = await make_broker(identity=identity)
    assert await _authorized(untrusting, token) == "IDENTITY_PROVIDER_UNAVAILABLE"
    assert any(UNTRUSTED in line for line in log_lines)
    trusting = await make_broker(identity=identity, http={"ca_file": str(pki.ca_file)})
    assert await _authorized(trusting, token) == "OK"


def test_the_ca_file_adds_to_the_default_trust(pki: PrivatePKI) -> None:
    from broker.oauth.tls import outbound_ssl_context

    default = outbound_ssl_context(None)
    with_ca = outbound_ssl_context(pki.ca_file)
    assert default.verify_mode == with_ca.verify_mode == ssl.CERT_REQUIRED and with_ca.check_hostname
    names = [dict(x[0] for x in cert["subject"]).get("commonName") for cert in with_ca.get_ca_certs()]
    assert "private-ca" in names
    assert len(with_ca.get_ca_certs()) == len(default.get_ca_certs()) + 1 > 1
    # The default trust is httpx's own (certifi), as it was before the option existed.
    assert len(default.get_ca_certs()) == len(httpx.create_ssl_context(trust_env=False).get_ca_certs())


def test_a_relative_ca_file_is_taken_from_the_config_folder(tmp_path: Path, pki: PrivatePKI) -> None:
    (tmp_path / "keyring.json").write_text("{}")
    document = {"keyring": {"file": "keyring.json"}, "http": {"ca_file": pki.ca_file.name}}
    config = load_config(document, environ={}, base_dir=tmp_path)
    assert config.http.ca_file == pki.ca_file


def _write_config(tmp: Path, ca_file: Path) -> Path:
    from broker.crypto import generate_keyring_file

    keyring = tmp / "keyring.json"
    if not keyring.exists():
        generate_keyring_file(keyring)
    config = tmp / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": ["127.0.0.1:0"],
                "store": {"path": str(tmp / "data" / "broker.db")},
                "keyring": {"file": str(keyring)},
                "http": {"ca_file": str(ca_file)},
            }
        )
    )
    return config


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "cannot read {path} ("),
        ("folder", "cannot read {path} ("),
        ("garbage", "{path} holds no PEM CA certificate"),
        ("key_only", "{path} holds no PEM CA certificate"),
    ],
)
def test_an_unusable_ca_file_is_a_one_line_startup_error(
    tmp_path: Path, pki: PrivatePKI, case: str, expected: str
) -> None:
    path = tmp_path / f"{case}.pem"
    if case == "folder":
        path.mkdir()
    elif case == "garbage":
        path.write_text("not a certificate\n" + json.dumps({"a": 1}))
    elif case == "key_only":
        path.write_bytes(pki.key.read_bytes())
    commands = [["config", "check"], ["serve"]] if case == "missing" else [["config", "check"]]
    for command in commands:
        done = run_cli(*command, "--config", str(_write_config(tmp_path, path)), check=False)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"credential-broker: http.ca_file: {expected.format(path=path)}"), lines[0]
        assert "PEM" in lines[0]  # says what the file must be
    assert not (tmp_path / "data").exists()
