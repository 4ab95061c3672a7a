"""Pushed authorization requests (RFC 9126) through the real gRPC server.

A small loopback PAR endpoint (below) plays the authorization server's side and can misbehave:
slow, HTTP 500, no ``request_uri``, an absurd ``expires_in``, a 400 refusal whose description
echoes secrets. BuildAuthorizationURL must push the request (client-authenticated) and hand out
only ``client_id`` and ``request_uri``; when the push fails the caller gets a clear error within
the deadline, no flow is stored, and the server keeps serving. The whole round trip against a
real provider is in tests/test_real_oidc_provider.py.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import grpc
import pytest

from broker.config import load_config
from broker.errors import ConfigError
from tests import leakcheck
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc

REQUEST_URI_PREFIX = "urn:ietf:params:oauth:request_uri:"


class ParServer:
    """A PAR endpoint at /par and an RFC 8414 metadata document that names it."""

    def __init__(self, auth: AuthServer, *, require: bool = True, name_endpoint: bool = True) -> None:
        self.auth = auth
        self.require = require
        self.name_endpoint = name_endpoint
        self.behaviour = "ok"
        self.pushed: list[tuple[dict[str, str], dict[str, str]]] = []
        self.issued: list[str] = []
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if urlsplit(self.path).path == "/.well-known/oauth-authorization-server":
                    self._send(200, server.metadata())
                else:
                    self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
                status, answer = server.push(
                    dict(parse_qsl(body)), {k.lower(): v for k, v in self.headers.items()}
                )
                if status:
                    self._send(status, answer)

            def _send(self, status: int, answer: Any) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return self.base + "/par"

    def metadata(self) -> dict[str, Any]:
        document = {
            "issuer": self.base,
            "authorization_endpoint": self.auth.authorization_endpoint,
            "token_endpoint": self.auth.token_endpoint,
            "require_pushed_authorization_requests": self.require,
        }
        if self.name_endpoint:
            document["pushed_authorization_request_endpoint"] = self.endpoint
        return document

    def push(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        self.pushed.append((form, headers))
        uri = REQUEST_URI_PREFIX + secrets.token_urlsafe(16)
        if self.behaviour == "slow":
            self._stop.wait(5)
        if self.behaviour == "500":
            return 500, {"error": "server_error"}
        if self.behaviour == "no_request_uri":
            return 201, {"expires_in": 60}
        if self.behaviour == "huge_expires_in":
            return 201, {"request_uri": uri, "expires_in": 10**12}
        if self.behaviour == "refused":
            echo = f"you sent state={form.get('state')} verifier-challenge={form.get('code_challenge')}"
            return 400, {"error": "invalid_request", "error_description": echo}
        self.issued.append(uri)
        return 201, {"request_uri": uri, "expires_in": 60}

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def par(auth_server: AuthServer) -> Iterator[ParServer]:
    server = ParServer(auth_server)
    try:
        yield server
    finally:
        server.stop()


async def _broker(
    make_broker: BrokerFactory, auth_server: AuthServer, par: ParServer, **settings: Any
) -> Broker:
    client = auth_server.new_client(auth_method="client_secret_basic", redirect_uri=REDIRECT_URI)
    doc = upstream_doc(
        auth_server,
        client,
        pushed_authorization_requests=True,
        pushed_authorization_request_endpoint=par.endpoint,
    )
    return await make_broker(upstreams=[doc], client=client, **settings)


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


async def test_the_request_is_pushed_and_the_url_carries_only_client_id_and_request_uri(
    make_broker: BrokerFactory, auth_server: AuthServer, par: ParServer
) -> None:
    broker = await _broker(make_broker, auth_server, par)
    before = time.time()
    started = await broker.start_flow("alice", UPSTREAM)
    assert started.authorization_url.startswith(auth_server.authorization_endpoint + "?")
    assert _query(started.authorization_url) == {
        "client_id": [broker.client.client_id],
        "request_uri": [par.issued[-1]],
    }
    # RFC 9126 section 2.1: the pushed request carries every parameter, client-authenticated.
    form, headers = par.pushed[-1]
    assert form["response_type"] == "code" and form["state"] == started.state
    assert form["code_challenge_method"] == "S256" and form["code_challenge"]
    assert form["redirect_uri"] == REDIRECT_URI and form["client_id"] == broker.client.client_id
    assert headers["authorization"].startswith("Basic ")
    assert broker.query("SELECT COUNT(*) FROM pending_flows") == [(1,)]
    # The URL lives no longer than the request_uri does.
    assert started.expires_at.seconds <= before + 60 + 1

    # A NOT_CONNECTED answer's URL is pushed too.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("bob")
    url = error_info(info.value).metadata["authorization_url"]
    assert set(_query(url)) == {"client_id", "request_uri"}


@pytest.mark.parametrize("store_backend", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("behaviour", "status", "reason"),
    [
        ("slow", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("500", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("no_request_uri", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("huge_expires_in", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("refused", grpc.StatusCode.FAILED_PRECONDITION, "TOKEN_REQUEST_REJECTED"),
    ],
)
async def test_a_misbehaving_par_endpoint_is_a_clear_error_and_nothing_is_stored(
    make_broker: BrokerFactory,
    auth_server: AuthServer,
    par: ParServer,
    behaviour: str,
    status: grpc.StatusCode,
    reason: str,
) -> None:
    broker = await _broker(make_broker, auth_server, par, http={"timeout_seconds": 1})
    par.behaviour = behaviour
    began = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.start_flow("alice", UPSTREAM)
    assert time.monotonic() - began < 1 + 3  # the deadline, with a generous margin
    assert info.value.code() == status, info.value.details()
    assert error_info(info.value).reason == reason
    details = info.value.details()
    assert "pushed authorization request" in details
    assert "you sent" not in details  # never the server's description
    form, _ = par.pushed[-1]
    leakcheck.add_secret(form["state"], form["code_challenge"])
    assert broker.query("SELECT COUNT(*) FROM pending_flows") == [(0,)]

    # The server keeps serving: once the endpoint behaves, a flow starts.
    par.behaviour = "ok"
    started = await broker.start_flow("alice", UPSTREAM)
    assert _query(started.authorization_url)["request_uri"] == [par.issued[-1]]
    assert broker.query("SELECT COUNT(*) FROM pending_flows") == [(1,)]


async def test_discovery_turns_par_on_when_the_server_requires_it(
    make_broker: BrokerFactory, auth_server: AuthServer, par: ParServer
) -> None:
    client = auth_server.new_client(auth_method="client_secret_basic", redirect_uri=REDIRECT_URI)
    doc = upstream_doc(auth_server, client, issuer=par.base)
    for key in ("authorization_endpoint", "token_endpoint"):
        del doc["auth_broker"][key]
    broker = await make_broker(upstreams=[doc], client=client)
    auth = broker.app.config.upstreams[0].auth_broker
    assert auth.pushed_authorization_requests is True
    assert auth.pushed_authorization_request_endpoint == par.endpoint
    started = await broker.start_flow("alice", UPSTREAM)
    assert set(_query(started.authorization_url)) == {"client_id", "request_uri"}
    assert len(par.pushed) == 1


async def test_par_required_by_metadata_without_an_endpoint_stops_start_up(
    tmp_path: Any, auth_server: AuthServer
) -> None:
    from broker.app import build_app

    par = ParServer(auth_server, name_endpoint=False)
    try:
        client = auth_server.new_client(auth_method="client_secret_basic", redirect_uri=REDIRECT_URI)
        doc = upstream_doc(auth_server, client, issuer=par.base)
        config = load_config(
            {"keyring": {"file": str(tmp_path / "k.json")}, "upstreams": [doc]}, environ={}, base_dir=tmp_path
        )
        with pytest.raises(ConfigError) as info:
            build_app(config)
        assert info.value.message == (
            "upstreams[0].auth_broker.issuer: the metadata requires pushed authorization requests but "
            "names no pushed_authorization_request_endpoint; set pushed_authorization_request_endpoint"
        )
    finally:
        par.stop()


def test_par_without_an_endpoint_or_issuer_is_refused(tmp_path: Any, auth_server: AuthServer) -> None:
    client = auth_server.new_client(auth_method="client_secret_basic", redirect_uri=REDIRECT_URI)
    doc = upstream_doc(auth_server, client, pushed_authorization_requests=True)
    with pytest.raises(ConfigError) as info:
        load_config(
            {"keyring": {"file": str(tmp_path / "k.json")}, "upstreams": [doc]}, environ={}, base_dir=tmp_path
        )
    assert info.value.message.startswith(
        "upstreams[0].auth_broker.pushed_authorization_request_endpoint: required with pushed_authorization_requests"
    )


@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [
        (201, b'{"request_uri": "urn:x y", "expires_in": 60}', "request_uri is not a URI"),
        (201, b'{"request_uri": "' + b"u" * 2049 + b'", "expires_in": 60}', "request_uri is not a URI"),
        (201, b'{"request_uri": "urn:x", "expires_in": true}', "expires_in is missing"),
        (201, b'{"request_uri": "urn:x", "expires_in": "60"}', "expires_in is missing"),
        (201, b'{"request_uri": "urn:x", "expires_in": 0}', "expires_in is out of range"),
        (201, b'{"request_uri": "urn:x"}', "expires_in is missing"),
        (201, b'{"request_uri": 5, "expires_in": 60}', "no request_uri"),
        (201, b"<html>", "not a JSON object"),
        (302, b"", "answered HTTP 302"),
    ],
)
def test_a_push_answer_is_checked_before_use(status: int, body: bytes, problem: str) -> None:
    from broker.errors import UpstreamUnavailable
    from broker.oauth.rfc9126 import parse_push_response

    with pytest.raises(UpstreamUnavailable) as info:
        parse_push_response(status, body)
    assert problem in info.value.message
