"""Shared fixtures: a real loopback authorization server and a real broker on loopback gRPC."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.app import App, build_app
from broker.audit import MemorySink
from broker.clock import ManualClock
from broker.config import load_config
from broker.crypto import generate_keyring_file
from broker.logs import LOGGER_NAME
from tests import leakcheck
from tests.authserver import INSTANCES, AuthServer, Client
from tests.idp import IdentityProvider
from tests.pgcluster import DSN_ENV, PgCluster, fresh_schema, start_cluster

UPSTREAM = "gh"
UPSTREAM_URL = "https://api.gh.test"
REDIRECT_URI = "https://app.test/callback"


@pytest.fixture(scope="session", autouse=True)
def _leak_capture() -> Iterator[None]:
    """Capture every broker log record and every error status for the leak check."""
    import broker.rpc.servicer as servicer

    handler = leakcheck.CaptureHandler()
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    original = servicer.to_status

    def observed(error: Any) -> Any:
        leakcheck.observe_status(error.message, error.metadata)
        return original(error)

    servicer.to_status = observed  # type: ignore[assignment]
    try:
        yield
    finally:
        servicer.to_status = original  # type: ignore[assignment]
        logging.getLogger(LOGGER_NAME).removeHandler(handler)


@pytest.fixture(autouse=True)
def _leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test when a secret it created shows up in a log, an error or a database file."""
    leakcheck.reset()
    dirs = [request.getfixturevalue("tmp_path")] if "tmp_path" in request.fixturenames else []
    yield
    minted = [secret for server in list(INSTANCES) for secret in server.issued]
    leaks = leakcheck.check(dirs, minted)
    assert not leaks, "secrets leaked: " + "; ".join(sorted(set(leaks)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    s = leakcheck.stats
    terminalreporter.write_line(
        f"leak check: {s['tests']:.0f} tests, {s['secrets']:.0f} secret checks, {s['texts']:.0f} log/error texts, "
        f"{s['files']:.0f} database files and {s['pg_schemas']:.0f} PostgreSQL schemas "
        f"({int(s['bytes']) // 1024} KiB) searched in {s['seconds']:.1f} s"
    )
    from tests.fuzz_stats import FUZZ_CASES

    if FUZZ_CASES:
        total = sum(FUZZ_CASES.values())
        detail = ", ".join(f"{name} {n}" for name, n in sorted(FUZZ_CASES.items()))
        terminalreporter.write_line(f"fuzz: {total} cases run ({detail})")


def _running_auth_server() -> Iterator[AuthServer]:
    server = AuthServer().start()
    try:
        yield server
    finally:
        server.stop()
        assert server.internal_errors == []


@pytest.fixture
def auth_server() -> Iterator[AuthServer]:
    yield from _running_auth_server()


@pytest.fixture
def other_auth_server() -> Iterator[AuthServer]:
    """A second, independent authorization server (another upstream's)."""
    yield from _running_auth_server()


def error_info(exc: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "no rich status on the error"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


@dataclass
class Broker:
    """A running broker, its stub, the authorization server behind it and the client it uses."""

    app: App
    stub: pb_grpc.CredentialBrokerStub
    channel: grpc.aio.Channel
    clock: ManualClock
    auth: AuthServer
    client: Client
    tmp: Path
    document: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.app.config.store.path

    async def start_flow(
        self, user: str = "alice", upstream: str = UPSTREAM
    ) -> pb.BuildAuthorizationURLResponse:
        return await self.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id=user, upstream=upstream)
        )

    async def connect(self, user: str = "alice", upstream: str = UPSTREAM) -> pb.CompleteResponse:
        """A full connect flow through the RPCs and the authorization server's real endpoint."""
        started = await self.start_flow(user, upstream)
        callback = await asyncio.to_thread(self.auth.authorize, started.authorization_url, user)
        assert callback["state"] == started.state
        return await self.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user)
        )

    async def resolve(self, user: str = "alice", upstream: str = UPSTREAM, **kw: Any) -> pb.ResolveResponse:
        return await self.stub.Resolve(pb.ResolveRequest(user_id=user, upstream=upstream, **kw))

    def db_bytes(self) -> bytes:
        if self.app.config.store.backend == "postgres":
            # Every stored value, text and raw bytea alike, as the database holds it.
            out = []
            for table in ("credentials", "pending_flows"):
                for row in self.query(f"SELECT * FROM {table}"):
                    out += [v if isinstance(v, bytes) else str(v).encode() for v in row]
            return b"\x00".join(out)
        return b"".join(p.read_bytes() for p in self.db_path.parent.glob(self.db_path.name + "*"))

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run SQL (``?`` placeholders) straight against the broker's database, either backend."""
        store = self.app.config.store
        if store.backend == "postgres":
            import psycopg

            assert store.dsn is not None
            with psycopg.connect(store.dsn.get_secret_value(), autocommit=True) as pg:
                cursor = pg.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
                return cursor.fetchall() if cursor.description else []
        conn = sqlite3.connect(self.db_path)
        try:
            rows = conn.execute(sql, params).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """``query`` with each row as a dict by column name (sealed bytes as ``bytes``)."""
        store = self.app.config.store
        if store.backend == "postgres":
            import psycopg
            from psycopg.rows import dict_row

            assert store.dsn is not None
            with psycopg.connect(store.dsn.get_secret_value(), autocommit=True, row_factory=dict_row) as pg:
                cursor = pg.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
                found = cursor.fetchall() if cursor.description else []
                return [
                    {k: bytes(v) if isinstance(v, memoryview) else v for k, v in r.items()} for r in found
                ]
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            result = [dict(r) for r in conn.execute(sql, params).fetchall()]
            conn.commit()
            return result
        finally:
            conn.close()

    async def events_read(self) -> None:
        """Wait until the broker's event hub has read every event so far: a remembered read of
        a credential is then no longer dropped by the event of a change made before it."""
        hub = self.app.events
        assert hub is not None
        newest = self.app.store.last_event_sequence()
        while hub.position < newest:
            await asyncio.sleep(0.01)

    def open_store(self) -> Any:
        """A second store on the broker's database (another process or replica would open it)."""
        from broker.store import open_store

        return open_store(self.app.config.store)


def upstream_doc(auth: AuthServer, client: Client, **overrides: Any) -> dict[str, Any]:
    ab: dict[str, Any] = {
        "mode": "oauth_connect",
        "authorization_endpoint": auth.authorization_endpoint,
        "token_endpoint": auth.token_endpoint,
        "client_id": client.client_id,
        "token_endpoint_auth_method": client.auth_method,
        "redirect_uri": client.redirect_uris[0],
        "scopes": ["repo", "read:user"],
    }
    if client.client_secret is not None:
        ab["client_secret"] = client.client_secret
    ab.update(overrides)
    return {"name": UPSTREAM, "url": UPSTREAM_URL, "auth_broker": ab}


BrokerFactory = Callable[..., Awaitable[Broker]]


class RequestHeader(grpc.aio.UnaryUnaryClientInterceptor):
    """Sends the broker's SSRF-guard header on every call, as a real client must over TCP."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), ("x-credential-broker-request", "true")]
        return await continuation(details._replace(metadata=metadata), request)


class SyncRequestHeader(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The same for a synchronous channel (use with ``grpc.intercept_channel``)."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), ("x-credential-broker-request", "true")]
        return continuation(details._replace(metadata=metadata), request)


def _pg_unavailable(reason: str) -> None:
    """In CI (or with a DSN given) a missing PostgreSQL is a failure; locally a skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get(DSN_ENV):
        pytest.fail(f"PostgreSQL is required here: {reason}")
    pytest.skip(f"PostgreSQL not available: {reason}")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway cluster this test session owns (it may be stopped and restarted)."""
    cluster, reason = start_cluster()
    if cluster is None:
        _pg_unavailable(reason)
    assert cluster is not None
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_server_dsn(request: pytest.FixtureRequest) -> str:
    """The PostgreSQL server for tests: $CREDENTIAL_BROKER_TEST_PG_DSN, else our own cluster."""
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        return str(request.getfixturevalue("pg_cluster").dsn)
    import psycopg

    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.Error as exc:
        _pg_unavailable(f"{DSN_ENV} is set but the server does not answer ({type(exc).__name__})")
    return dsn


@pytest.fixture
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    """A DSN for this test alone: its own empty schema on the test server."""
    with fresh_schema(pg_server_dsn) as dsn:
        yield dsn


@pytest.fixture
def store_backend() -> str:
    """The store the ``make_broker`` brokers use; modules parametrize it to run on both."""
    return "sqlite"


@pytest.fixture
def store_doc(tmp_path: Path, store_backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``store`` config section of the ``make_broker`` brokers (one database per test)."""
    if store_backend == "postgres":
        return {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")}
    return {"path": str(tmp_path / "data" / "broker.db")}


@pytest.fixture
async def make_broker(
    tmp_path: Path, auth_server: AuthServer, store_doc: dict[str, Any]
) -> AsyncIterator[BrokerFactory]:
    """Build and start brokers; every one is stopped at the end of the test."""
    started: list[Broker] = []
    keyring = tmp_path / "keyring.json"
    generate_keyring_file(keyring)

    async def factory(
        *,
        auth_method: str = "client_secret_basic",
        upstreams: list[dict[str, Any]] | None = None,
        clock: ManualClock | None = None,
        client: Client | None = None,
        **settings: Any,
    ) -> Broker:
        client = client or auth_server.new_client(auth_method=auth_method, redirect_uri=REDIRECT_URI)
        document: dict[str, Any] = {
            # Each broker its own socket: a second one never takes over the first's (a replica).
            "listen": ["127.0.0.1:0", f"unix://{tmp_path}/broker{len(started) or ''}.sock"],
            "store": store_doc,
            "keyring": {"file": str(keyring)},
            "upstreams": upstreams if upstreams is not None else [upstream_doc(auth_server, client)],
            **settings,
        }
        # Background refresh is off unless a test asks for it: other tests count refresh grants.
        document.setdefault("background_refresh", {"enabled": False})
        config = load_config(document, environ={}, base_dir=tmp_path)
        clock = clock or ManualClock(time.time())
        audit = MemorySink()
        app = build_app(config, clock=clock, audit_sinks=[audit])
        await app.start()
        channel = grpc.aio.insecure_channel(app.server.addresses[0], interceptors=[RequestHeader()])
        broker = Broker(
            app,
            pb_grpc.CredentialBrokerStub(channel),
            channel,
            clock,
            auth_server,
            client,
            tmp_path,
            document,
            {"audit": audit},
        )
        started.append(broker)
        return broker

    yield factory
    for broker in reversed(started):
        await broker.channel.close()
        await broker.app.stop(grace=1)


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> Broker:
    return await make_broker()


@pytest.fixture
def live_broker(tmp_path: Path, auth_server: AuthServer) -> Iterator[Any]:
    """A broker subprocess started through the CLI (see tests/live.py)."""
    from tests.live import start_live_broker

    live = start_live_broker(tmp_path, auth_server)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    """A loopback OpenID Connect provider with one RSA ("rsa-1") and one EC ("ec-1") key."""
    provider = IdentityProvider().start()
    provider.add_key("rsa", "rsa-1")
    provider.add_key("ec", "ec-1")
    try:
        yield provider
    finally:
        provider.stop()
