"""Hosted connect (issue 16, item 1): the broker's own /start and /callback, over real HTTP.

A broker with ``connect`` configured serves an HTTP listener on loopback. These tests drive it
with a plain HTTP client (cookies handled by hand, so every attribute is checked) against the
loopback authorization server, on both store backends; tests/test_connect_browser.py drives
the same flow in a real browser.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import grpc
import httpx
import pytest
import yaml

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.config import load_config
from broker.errors import ConfigError
from tests import leakcheck
from tests.authserver import AuthServer
from tests.brokerproc import run_cli
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc
from tests.hosted import LandingPage, free_port, hosted_broker, landing_page

COOKIE = "credential_broker_connect"
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every flow test here runs on both store backends."""
    return str(request.param)


@pytest.fixture
def landing() -> Any:
    yield from landing_page()


def _check_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers)
    assert response.headers["server"] == "credential-broker"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp


def _set_cookie(response: httpx.Response) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        jar.load(header)
    return jar


class Browserish:
    """An HTTP client with one cookie, as a browser keeps it (set and cleared by the broker)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.cookie: str | None = None
        self.client = httpx.AsyncClient(follow_redirects=False, timeout=10)

    async def get(self, url: str) -> httpx.Response:
        for reference in parse_qs(urlsplit(url).query).get("flow", []):
            leakcheck.add_secret(reference)  # a one-time link is a secret until used
        headers = {"cookie": f"{COOKIE}={self.cookie}"} if self.cookie else {}
        response = await self.client.get(url, headers=headers)
        _check_headers(response)
        jar = _set_cookie(response)
        if COOKIE in jar:
            morsel = jar[COOKIE]
            self.cookie = None if morsel["max-age"] == "0" or not morsel.value else morsel.value
            leakcheck.add_secret(*(self.cookie or "").split("."))
        for secret in self.broker.auth.issued:  # no page shows a code, token or state
            assert secret not in response.text
        return response

    async def start(self, url: str) -> httpx.Response:
        response = await self.get(url)
        assert response.status_code == 302, response.text
        return response

    async def callback(self, query: dict[str, str]) -> httpx.Response:
        response = await self.get(self.broker.extra["connect_base"] + "/callback?" + urlencode(query))
        for name in ("code", "state", "iss"):
            assert query.get(name, "\x00") not in response.headers.get("location", "")
        return response

    async def aclose(self) -> None:
        await self.client.aclose()


async def _authorized(broker: Broker, location: str, user: str = "alice", **kw: Any) -> dict[str, str]:
    """The authorization server's redirect back to the broker's callback, as a query."""
    return await asyncio.to_thread(broker.auth.authorize, location, user, **kw)


def _landing(response: httpx.Response, landing: LandingPage) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(landing.url + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def _count(broker: Broker, table: str) -> int:
    return int(broker.query(f"SELECT COUNT(*) FROM {table}")[0][0])


async def test_authorization_url_is_a_one_time_start_link(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing, path="/connect")
    started = await broker.start_flow("alice")
    url = started.authorization_url
    assert url.startswith(broker.extra["public_url"] + "/start?flow=")
    reference = parse_qs(urlsplit(url).query)["flow"][0]
    assert len(reference) >= 43 and set(urlsplit(url).query.split("&")) == {f"flow={reference}"}
    assert started.state == ""  # the broker's callback completes the flow: no state for the caller
    leakcheck.add_secret(reference)
    assert reference.encode() not in broker.db_bytes()
    # NOT_CONNECTED hands out the same live link (the user may already be on the way).
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert error_info(info.value).reason == "NOT_CONNECTED"
    assert error_info(info.value).metadata["authorization_url"] == url


async def test_whole_flow_over_http_then_resolve(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing, path="/connect")
    started = await broker.start_flow("alice")
    browser = Browserish(broker)
    try:
        response = await browser.start(started.authorization_url)
        location = response.headers["location"]
        assert location.startswith(auth_server.authorization_endpoint + "?")
        query = parse_qs(urlsplit(location).query)
        assert query["redirect_uri"] == [broker.extra["public_url"] + "/callback"]
        morsel = _set_cookie(response)[COOKIE]
        assert morsel["httponly"] and morsel["samesite"] == "Lax" and morsel["path"] == "/connect"
        assert not morsel["secure"]  # loopback http: a browser would drop a Secure cookie
        assert browser.cookie is not None
        leakcheck.add_secret(browser.cookie)
        # Only the secret's hash is stored with the flow.
        (stored,) = broker.query("SELECT browser_hash FROM pending_flows")[0]
        assert stored == hashlib.sha256(browser.cookie.encode()).hexdigest()
        assert browser.cookie.encode() not in broker.db_bytes()
        done = _landing(await browser.callback(await _authorized(broker, location)), landing)
        assert done == {"upstream": UPSTREAM, "status": "connected"}
        assert browser.cookie is None  # cleared
        assert _count(broker, "pending_flows") == 0
    finally:
        await browser.aclose()
    resolved = await broker.resolve("alice")
    assert auth_server.access_token_info(resolved.access_token)["user"] == "alice"  # type: ignore[index]
    audit = [(e.action, e.outcome, e.user) for e in broker.extra["audit"].events]
    assert ("acquire", "success", "alice") in audit


async def test_second_start_of_the_same_link_is_refused(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    first, second = Browserish(broker), Browserish(broker)
    try:
        await first.start(started.authorization_url)
        (bound,) = broker.query("SELECT browser_hash FROM pending_flows")[0]
        again = await second.get(started.authorization_url)
        assert again.status_code == 410 and "set-cookie" not in again.headers
        assert second.cookie is None
        repeat = await first.get(started.authorization_url)  # the same browser, too
        assert repeat.status_code == 410
        assert broker.query("SELECT browser_hash FROM pending_flows")[0][0] == bound
        # A bound flow is not handed out again: the next NOT_CONNECTED answer is a new link.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.resolve("alice")
        fresh = error_info(info.value).metadata["authorization_url"]
        assert fresh != started.authorization_url
        assert (await second.start(fresh)).status_code == 302
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.parametrize("cookie", ["none", "wrong"])
async def test_callback_from_another_browser_is_refused(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage, cookie: str
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    owner, other = Browserish(broker), Browserish(broker)
    try:
        location = (await owner.start(started.authorization_url)).headers["location"]
        callback = await _authorized(broker, location)
        if cookie == "wrong":
            other.cookie = secrets.token_urlsafe(32)
        refused = await other.callback(callback)
        assert refused.status_code == 403 and "location" not in refused.headers
        assert callback["state"] not in refused.text
        assert auth_server.token_requests() == []  # the code was never presented
        assert _count(broker, "credentials") == 0
        assert _count(broker, "pending_flows") == 1  # the owner's flow is untouched
        done = _landing(await owner.callback(callback), landing)
        assert done["status"] == "connected"
    finally:
        await owner.aclose()
        await other.aclose()


async def test_deny(make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    browser = Browserish(broker)
    try:
        location = (await browser.start(started.authorization_url)).headers["location"]
        callback = await _authorized(broker, location, deny=True)
        assert callback["error"] == "access_denied"
        done = _landing(await browser.callback(callback), landing)
        assert done == {"upstream": UPSTREAM, "status": "denied", "reason": "access_denied"}
        assert browser.cookie is None
    finally:
        await browser.aclose()
    assert _count(broker, "pending_flows") == 0 and _count(broker, "credentials") == 0
    assert auth_server.token_requests() == []


async def test_expired_flow(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    late = await broker.start_flow("bob")
    browser, other = Browserish(broker), Browserish(broker)
    try:
        location = (await browser.start(started.authorization_url)).headers["location"]
        callback = await _authorized(broker, location)
        broker.clock.advance(601)
        # An expired link cannot be started ...
        assert (await other.get(late.authorization_url)).status_code == 410
        # ... and an expired flow is not completed, even from its own browser.
        done = _landing(await browser.callback(callback), landing)
        assert done == {"upstream": UPSTREAM, "status": "failed", "reason": "flow_expired"}
    finally:
        await browser.aclose()
        await other.aclose()
    assert auth_server.token_requests() == []
    assert _count(broker, "credentials") == 0


async def test_replayed_callback(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    browser = Browserish(broker)
    try:
        response = await browser.start(started.authorization_url)
        secret = browser.cookie
        callback = await _authorized(broker, response.headers["location"])
        assert _landing(await browser.callback(callback), landing)["status"] == "connected"
        before = broker.query("SELECT generation FROM credentials")
        # The cookie was cleared: the same URL again is refused outright ...
        assert (await browser.callback(callback)).status_code == 403
        # ... and with the old cookie put back, the flow is gone.
        browser.cookie = secret
        done = _landing(await browser.callback(callback), landing)
        assert done == {"status": "failed", "reason": "flow_not_found"}
    finally:
        await browser.aclose()
    assert len(auth_server.token_requests()) == 1  # the code was presented once
    assert broker.query("SELECT generation FROM credentials") == before


async def test_rpc_complete_cannot_bypass_the_browser_binding(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    browser = Browserish(broker)
    try:
        location = (await browser.start(started.authorization_url)).headers["location"]
        callback = await _authorized(broker, location)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.stub.Complete(
                pb.CompleteRequest(state=callback["state"], code=callback["code"], user_id="alice")
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert auth_server.token_requests() == []
        assert _count(broker, "credentials") == 0
    finally:
        await browser.aclose()


async def test_two_flows_in_one_browser(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    """Two tabs, two flows: each completes (the cookie keeps one secret per started flow)."""
    broker = await hosted_broker(make_broker, auth_server, landing)
    first, second = await broker.start_flow("alice"), await broker.start_flow("alice")
    browser = Browserish(broker)
    try:
        one = (await browser.start(first.authorization_url)).headers["location"]
        two = (await browser.start(second.authorization_url)).headers["location"]
        assert (
            _landing(await browser.callback(await _authorized(broker, one)), landing)["status"] == "connected"
        )
        assert (
            _landing(await browser.callback(await _authorized(broker, two)), landing)["status"] == "connected"
        )
    finally:
        await browser.aclose()


@pytest.mark.parametrize("store_backend", ["sqlite"])
async def test_bad_requests_and_unknown_paths(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage, store_backend: str
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    base = broker.extra["connect_base"]
    browser = Browserish(broker)
    try:
        for url, status in [
            (f"{base}/start", 400),
            (f"{base}/start?flow=%00", 400),
            (f"{base}/start?flow=" + "a" * 43, 410),
            (f"{base}/callback", 400),
            (f"{base}/callback?state=x&state=y&code=c", 400),
            (f"{base}/callback?state=" + "a" * 43 + "&code=c", 403),
            (f"{base}/elsewhere", 404),
        ]:
            response = await browser.get(url)
            assert response.status_code == status, (url, response.text)
        head = await browser.client.head(f"{base}/start?flow=" + "a" * 43)
        assert head.status_code == 405  # a HEAD (a link preview) never uses a link up
        _check_headers(head)
    finally:
        await browser.aclose()
    assert len(broker.app.server.addresses) >= 1  # the gRPC side still serves
    await broker.start_flow("alice")


@pytest.mark.parametrize("store_backend", ["sqlite"])
async def test_secure_cookie_behind_a_tls_proxy(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage, store_backend: str
) -> None:
    """public_url https (TLS ends at a proxy before the listener): the cookie is Secure."""
    broker = await hosted_broker(
        make_broker, auth_server, landing, public_url="https://connect.example.test/broker"
    )
    started = await broker.start_flow("alice")
    assert started.authorization_url.startswith("https://connect.example.test/broker/start?flow=")
    local = broker.extra["connect_base"] + "/broker/start?" + urlsplit(started.authorization_url).query
    browser = Browserish(broker)
    try:
        response = await browser.start(local)
        morsel = _set_cookie(response)[COOKIE]
        assert morsel["secure"] and morsel["path"] == "/broker"
    finally:
        await browser.aclose()


# -- configuration ------------------------------------------------------------------------


def _document(tmp_path: Path, auth_server: AuthServer, **connect: Any) -> dict[str, Any]:
    client = auth_server.new_client(redirect_uri="https://broker.example.test/callback")
    return {
        "keyring": {"file": str(tmp_path / "keyring.json")},
        "upstreams": [upstream_doc(auth_server, client, redirect_uri=connect.pop("redirect_uri", None))],
        "connect": {
            "listen": "127.0.0.1:8085",
            "public_url": "https://broker.example.test",
            "return_to": "https://app.example.test/connected",
            **connect,
        },
    }


def test_config_redirect_uri_must_be_the_callback(tmp_path: Path, auth_server: AuthServer) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            _document(tmp_path, auth_server, redirect_uri="https://app.test/callback"),
            environ={},
            base_dir=tmp_path,
        )
    assert info.value.message == (
        "upstreams[0].auth_broker.redirect_uri: must be https://broker.example.test/callback "
        "(connect.public_url + /callback) when hosted connect is on, or left out"
    )
    # Left out, it is the callback.
    config = load_config(_document(tmp_path, auth_server), environ={}, base_dir=tmp_path)
    assert config.upstreams[0].auth_broker.redirect_uri == "https://broker.example.test/callback"
    assert config.connect is not None and config.connect.cookie_name == COOKIE


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"public_url": "http://broker.example.test"}, "connect.public_url: must use https"),
        ({"public_url": "https://broker.example.test/x?y=1"}, "connect.public_url: must not have a query"),
        ({"return_to": "ftp://app"}, "connect.return_to: must be an absolute http(s) URL"),
        ({"cookie_name": "a b"}, "connect.cookie_name: "),
        ({"listen": "unix:///tmp/x.sock"}, "connect.listen: must be host:port"),
        ({"listen": "nowhere"}, "connect.listen: "),
    ],
)
def test_config_errors_name_the_field(
    tmp_path: Path, auth_server: AuthServer, setting: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_document(tmp_path, auth_server, **setting), environ={}, base_dir=tmp_path)
    assert message in info.value.message


@pytest.mark.parametrize("command", [["config", "check"], ["serve"]])
def test_connect_listen_in_use_is_one_line(
    tmp_path: Path, auth_server: AuthServer, command: list[str]
) -> None:
    from broker.crypto import generate_keyring_file

    generate_keyring_file(tmp_path / "keyring.json")
    port = free_port()
    document = _document(tmp_path, auth_server, listen=f"127.0.0.1:{port}")
    document.update(listen=["127.0.0.1:0"], store={"path": str(tmp_path / "data" / "broker.db")})
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump(document))
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        done = run_cli(*command, "--config", str(config), check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"credential-broker: connect.listen: 127.0.0.1:{port} is already in use"


@pytest.mark.parametrize("store_backend", ["sqlite"])
async def test_workers_share_the_connect_port(
    tmp_path: Path,
    auth_server: AuthServer,
    landing: LandingPage,
    store_doc: dict[str, Any],
    store_backend: str,
) -> None:
    """serve --workers N: every worker process builds the app with reuse_port, and each binds
    the connect listener on the same port (any of them can answer: the flows are in the store)."""
    from broker.app import build_app
    from broker.crypto import generate_keyring_file

    generate_keyring_file(tmp_path / "keyring.json")
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    client = auth_server.new_client(redirect_uri=public + "/callback")
    document = {
        "listen": ["127.0.0.1:0"],
        "store": store_doc,
        "keyring": {"file": str(tmp_path / "keyring.json")},
        "background_refresh": {"enabled": False},
        "upstreams": [upstream_doc(auth_server, client, redirect_uri=None)],
        "connect": {"listen": f"127.0.0.1:{port}", "public_url": public, "return_to": landing.url},
    }
    config = load_config(document, environ={}, base_dir=tmp_path)
    apps = [build_app(config, reuse_port=True) for _ in range(2)]
    try:
        for app in apps:
            await app.start()
        assert [app.connect_server.address for app in apps] == [f"127.0.0.1:{port}"] * 2  # type: ignore[union-attr]
        started = await apps[0].service.build_authorization_url("alice", UPSTREAM)
        async with httpx.AsyncClient() as http:
            response = await http.get(started.authorization_url, follow_redirects=False)
        assert response.status_code == 302
    finally:
        for app in apps:
            await app.stop(grace=0)


@pytest.mark.parametrize("store_backend", ["sqlite"])
async def test_connect_port_taken_after_the_preflight_is_one_line(
    tmp_path: Path,
    auth_server: AuthServer,
    landing: LandingPage,
    store_doc: dict[str, Any],
    store_backend: str,
) -> None:
    """A port taken between the pre-flight and the start: named, and the gRPC server stops."""
    import socket

    from broker.app import build_app
    from broker.crypto import generate_keyring_file

    generate_keyring_file(tmp_path / "keyring.json")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        public = f"http://127.0.0.1:{port}"
        client = auth_server.new_client(redirect_uri=public + "/callback")
        document = {
            "listen": ["127.0.0.1:0"],
            "store": store_doc,
            "keyring": {"file": str(tmp_path / "keyring.json")},
            "background_refresh": {"enabled": False},
            "upstreams": [upstream_doc(auth_server, client, redirect_uri=None)],
            "connect": {"listen": f"127.0.0.1:{port}", "public_url": public, "return_to": landing.url},
        }
        app = build_app(load_config(document, environ={}, base_dir=tmp_path))
        try:
            with pytest.raises(ConfigError) as info:
                await app.start()
        finally:
            await app.tokens.aclose()
            app.store.close()
    assert info.value.message == f"connect.listen: 127.0.0.1:{port} is already in use"
