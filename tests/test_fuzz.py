"""Property-based fuzzing (hypothesis) of every RPC and of the authorization server's answers.

The broker runs in a background thread on a real loopback port; the cases call it through the
real (synchronous) stub. Each property: a proper status (never INTERNAL or UNKNOWN), nothing
wrong stored, and the server keeps serving. Every property runs on both stores, SQLite and
PostgreSQL (a schema of its own on the test server). The case count is printed in the terminal
summary; ``FUZZ_EXAMPLES`` sets the budget per property and store (default 300).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.app import App, build_app
from broker.config import load_config
from broker.crypto import EnvelopeCipher, FileKeySource, generate_keyring_file
from broker.oauth.rfc6749 import MAX_EXPIRES_IN
from broker.store import open_store
from broker.vault import CredentialVault
from tests import fuzz_stats, leakcheck
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, UPSTREAM, SyncRequestHeader, upstream_doc
from tests.pgcluster import dump_schema, fresh_schema

settings.register_profile(
    "broker-fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
FUZZ = settings.get_profile("broker-fuzz")
MAX_RESPONSE_BYTES = 64 * 1024  # the fuzzed broker's http.max_response_bytes

NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


@dataclass
class Env:
    app: App
    auth: AuthServer
    stub: pb_grpc.CredentialBrokerStub
    channel: grpc.Channel
    tmp: Path
    alice_token: str
    dsn: str | None = None  # PostgreSQL: the DSN of the fuzzed broker's own schema

    @property
    def backend(self) -> str:
        return "sqlite" if self.dsn is None else "postgres"

    def dump(self) -> None:
        """PostgreSQL: every stored value, for the leak check (SQLite's file is read as is)."""
        if self.dsn is None:
            return
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as pg:
            row = pg.execute("SELECT current_schema()").fetchone()
            assert row is not None
            leakcheck.add_database_dump(f"PostgreSQL schema {row[0]}", dump_schema(pg, str(row[0])))

    def count(self, table: str) -> int:
        if self.dsn is not None:
            import psycopg

            with psycopg.connect(self.dsn, autocommit=True) as pg:
                found = pg.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
                assert found is not None
                return int(found[0])
        conn = sqlite3.connect(self.app.config.store.path)
        try:
            return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        finally:
            conn.close()

    def serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    def connect(self, user: str) -> None:
        started = self.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id=user, upstream=UPSTREAM), timeout=10
        )
        callback = self.auth.authorize(started.authorization_url, user)
        self.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user), timeout=10
        )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Env]:
    if request.param == "postgres":
        with fresh_schema(request.getfixturevalue("pg_server_dsn")) as dsn:
            yield from _env(tmp_path_factory, dsn)
    else:
        yield from _env(tmp_path_factory, None)


def _env(tmp_path_factory: pytest.TempPathFactory, dsn: str | None) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("fuzz")
    auth = AuthServer().start()
    client = auth.new_client(redirect_uri=REDIRECT_URI)
    generate_keyring_file(tmp / "keyring.json")
    document = {
        "listen": ["127.0.0.1:0"],
        "store": {"backend": "postgres", "dsn": dsn} if dsn else {"path": str(tmp / "broker.db")},
        "keyring": {"file": str(tmp / "keyring.json")},
        "http": {"timeout_seconds": 5, "max_response_bytes": MAX_RESPONSE_BYTES},
        "upstreams": [upstream_doc(auth, client)],
    }
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> App:  # grpc.aio binds the server to the loop it is built on
        built = build_app(load_config(document, environ={}, base_dir=tmp))
        await built.start()
        return built

    app = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    channel = grpc.intercept_channel(grpc.insecure_channel(app.server.addresses[0]), SyncRequestHeader())
    stub = pb_grpc.CredentialBrokerStub(channel)
    env = Env(app, auth, stub, channel, tmp, "", dsn)
    env.connect("alice")
    env.alice_token = stub.Resolve(pb.ResolveRequest(user_id="alice", upstream=UPSTREAM)).access_token
    try:
        yield env
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(app.stop(grace=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        auth.stop()


@pytest.fixture(autouse=True)
def _watch(env: Env) -> Iterator[None]:
    leakcheck.add_path(env.tmp)
    yield
    env.dump()


# -- request fields -------------------------------------------------------------------------

LOOKALIKES = [
    "alice",
    "\u0430lice",  # Cyrillic a
    "\uff41\uff4c\uff49\uff43\uff45",  # fullwidth
    "alice\u200b",  # zero-width space
    "ALICE",
    "al\u0131ce",  # dotless i
    "alice\u0301",  # combining accent
    "a\u200dlice",
    "alice ",
    " alice",
    "alice\x00",
    "alice\n",
    "\u202ealice",
]
SPECIAL = [
    "",
    "x" * 257,
    "y" * 70_000,
    "\x00" * 10,
    "\x7f",
    "\ud7ff",
    "../../etc/passwd",
    "'; DROP TABLE credentials; --",
    "%00",
    "\u2028",
    UPSTREAM,
    "S" * 43,
]
fields = st.one_of(
    st.sampled_from(LOOKALIKES + SPECIAL), st.text(max_size=300), st.text(min_size=1000, max_size=5000)
)


@st.composite
def rpc_calls(draw: st.DrawFn) -> tuple[str, Any]:
    method = draw(st.sampled_from(["BuildAuthorizationURL", "Complete", "Deny", "Refresh", "Resolve"]))
    if method == "BuildAuthorizationURL":
        return method, pb.BuildAuthorizationURLRequest(user_id=draw(fields), upstream=draw(fields))
    if method == "Complete":
        return method, pb.CompleteRequest(state=draw(fields), code=draw(fields), user_id=draw(fields))
    if method == "Deny":
        return method, pb.DenyRequest(state=draw(fields), error=draw(fields), error_description=draw(fields))
    if method == "Refresh":
        return method, pb.RefreshRequest(
            user_id=draw(fields),
            upstream=draw(st.sampled_from([UPSTREAM])) if draw(st.booleans()) else draw(fields),
        )
    return method, pb.ResolveRequest(
        user_id=draw(fields),
        upstream=UPSTREAM if draw(st.booleans()) else draw(fields),
        subject_token=draw(fields),
        min_valid_seconds=draw(st.integers(0, 2**32 - 1)),
    )


@FUZZ
@given(call=rpc_calls())
def test_fuzz_every_rpc(env: Env, call: tuple[str, Any]) -> None:
    fuzz_stats.count(f"rpc fields on {env.backend}")
    method, request = call
    credentials = env.count("credentials")
    try:
        answer = getattr(env.stub, method)(request, timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        answer = None
        assert len(exc.details() or "") < 300  # type: ignore[attr-defined]
    assert code not in NEVER, (method, code)
    if method == "Resolve" and code is grpc.StatusCode.OK:
        # Only alice is connected: a look-alike never gets her token. (A drawn Refresh of alice,
        # or a Resolve with a large min_valid_seconds, rotates it: compare the token's owner.)
        assert request.user_id == "alice"
        assert (
            answer.access_token == env.alice_token
            or (env.auth.access_token_info(answer.access_token) or {}).get("user") == "alice"
        )
    assert env.count("credentials") == credentials  # no random field creates a credential
    env.serving()


def _raw(field_number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field carrying ``payload`` as is (maybe invalid UTF-8)."""
    out = bytearray([field_number << 3 | 2])
    length = len(payload)
    while True:
        byte = length & 0x7F
        length >>= 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + payload


@FUZZ
@given(
    method=st.sampled_from(["BuildAuthorizationURL", "Complete", "Deny", "Refresh", "Resolve"]),
    field_number=st.integers(1, 4),
    payload=st.binary(max_size=300).filter(lambda b: not _utf8(b))
    | st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80"]),
    tail=st.binary(max_size=40),
)
def test_fuzz_invalid_utf8_and_raw_bytes(
    env: Env, method: str, field_number: int, payload: bytes, tail: bytes
) -> None:
    fuzz_stats.count(f"raw bytes on {env.backend}")
    call = env.channel.unary_unary(
        f"/credentialbroker.v1.CredentialBroker/{method}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    try:
        call(_raw(field_number, payload) + tail, timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
    assert code not in NEVER, (method, code)
    env.serving()


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


# -- the authorization server's answers -----------------------------------------------------

_BOMBS = [
    gzip.compress(b'{"access_token": "at_bomb", "pad": "' + b" " * (MAX_RESPONSE_BYTES - 40) + b'"}'),
    gzip.compress(b" " * (MAX_RESPONSE_BYTES + 1)),
    gzip.compress(b"0" * (8 * 1024 * 1024)),
]
junk_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**18), 10**18),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
token_values = st.one_of(
    st.builds(
        lambda s: "at_fz" + s,
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=8, max_size=40),
    ),
    junk_values,
    st.just("a" * 70_000),
    st.just("tok\nen"),
)
expires = st.one_of(
    st.integers(-(10**15), 10**15),
    st.sampled_from([0, 1, 59, 61, 3600, MAX_EXPIRES_IN, MAX_EXPIRES_IN + 1, -1, "3600", " 12 ", "1e3"]),
    junk_values,
)


@st.composite
def answers(draw: st.DrawFn) -> tuple[int, bytes, dict[str, str]]:
    status = draw(st.sampled_from([200, 200, 200, 200, 201, 204, 302, 400, 401, 403, 429, 500, 503]))
    headers = {
        "Content-Type": draw(
            st.sampled_from(["application/json", "text/html", "application/json; charset=latin-1"])
        )
    }
    shape = draw(st.sampled_from(["object", "object", "object", "raw", "bomb", "array"]))
    if shape == "bomb":
        headers["Content-Encoding"] = "gzip"
        return status, draw(st.sampled_from(_BOMBS)), headers
    if shape == "raw":
        body = draw(
            st.one_of(st.binary(max_size=500), st.sampled_from([b"", b"null", b"{", b"\xff\xfe{}", b"[]"]))
        )
        if draw(st.booleans()):
            headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "br", "deflate", "identity"]))
        return status, body, headers
    if shape == "array":
        return status, json.dumps(draw(st.lists(junk_values, max_size=3))).encode(), headers
    document: dict[str, Any] = {}
    for key, values in (
        ("access_token", token_values),
        ("token_type", st.one_of(st.just("Bearer"), junk_values)),
        ("expires_in", expires),
        (
            "refresh_token",
            st.one_of(
                st.builds(
                    lambda s: "rt_fz" + s, st.text(alphabet="abcdef0123456789", min_size=8, max_size=20)
                ),
                junk_values,
            ),
        ),
        ("scope", st.one_of(st.just("repo read:user"), junk_values)),
        (
            "error",
            st.one_of(
                st.sampled_from(["invalid_grant", "invalid_client", "server_error", "nope"]), junk_values
            ),
        ),
    ):
        if draw(st.booleans()):
            document[key] = draw(values)
    return status, json.dumps(document).encode(), headers


@FUZZ
@given(answer=answers())
# Found by this fuzz test: a corrupt gzip body was an INTERNAL error (zlib.error escaped).
@example(answer=(200, b"\x00\x00", {"Content-Type": "application/json", "Content-Encoding": "gzip"}))
def test_fuzz_authorization_server_answers(env: Env, answer: tuple[int, bytes, dict[str, str]]) -> None:
    fuzz_stats.count(f"authorization server answers on {env.backend}")
    status, body, headers = answer
    if status == 204:
        body = b""  # a 204 with a body breaks HTTP framing on the test server's side, not ours
    for value in _token_strings(body):
        leakcheck.add_secret(value)
    user = f"fz{time.monotonic_ns()}"
    env.connect(user)
    vault = CredentialVault(
        open_store(env.app.config.store), EnvelopeCipher(FileKeySource(env.tmp / "keyring.json").load())
    )
    try:
        key = env.app.config.upstreams[0].key
        before = vault.get(user, key)
        assert before is not None
        env.auth.fail_next("custom", status=status, body=body, headers=headers)
        try:
            env.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM), timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
        assert code in (
            grpc.StatusCode.OK,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.FAILED_PRECONDITION,
        ), code
        after = vault.get(user, key)
        assert after is not None  # never deleted, always opens
        credential = after[0]
        if code is grpc.StatusCode.OK:
            token = credential.secrets.access_token
            assert token and token.isprintable() and len(token) <= 64 * 1024
            assert credential.expires_at is None or (
                math.isfinite(credential.expires_at)
                and -5 <= credential.expires_at - time.time() <= MAX_EXPIRES_IN + 5
            )
        else:
            # A failed refresh keeps the stored secrets exactly as they were.
            assert credential.secrets.access_token == before[0].secrets.access_token
            assert credential.secrets.refresh_token == before[0].secrets.refresh_token
    finally:
        vault.store.close()
    env.serving()


def _token_strings(body: bytes) -> list[str]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(document, dict):
        return []
    # Only the random, prefixed tokens: a shrunk junk value such as "00000000" would match any
    # zero-filled database page by chance.
    return [
        v
        for k, v in document.items()
        if k in ("access_token", "refresh_token") and isinstance(v, str) and v.startswith(("at_fz", "rt_fz"))
    ]
