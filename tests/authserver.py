"""A real OAuth 2.0 authorization server for tests, served over HTTP on 127.0.0.1.

Tests never mock the network: they start an :class:`AuthServer` on a loopback port and let the
code under test talk to it over real HTTP. The server implements

* the authorization endpoint with mandatory PKCE S256 (RFC 6749 §4.1, RFC 7636, RFC 9207),
* the token endpoint: ``authorization_code``, ``refresh_token`` with rotation and reuse detection
  (RFC 6749 §6, RFC 9700 §4.14.2), token exchange (RFC 8693 §2) and the Entra ID on-behalf-of
  ``jwt-bearer`` grant,
* the revocation endpoint (RFC 7009) and token introspection (RFC 7662),
* authorization server metadata (RFC 8414),

plus fault injection on the token endpoint (:meth:`AuthServer.fail_next`) and a record of every
request and every secret it ever minted or was shown, for leak checks.

Only the standard library is used, so this module adds no dependency.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import html
import http.client
import json
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlencode, urlsplit

__all__ = [
    "FAILURE_KINDS",
    "GRANT_JWT_BEARER",
    "GRANT_TOKEN_EXCHANGE",
    "TOKEN_TYPE_ACCESS_TOKEN",
    "AuthServer",
    "AuthorizeError",
    "Client",
    "RecordedRequest",
    "ServerTLS",
]

GRANT_AUTHORIZATION_CODE = "authorization_code"
GRANT_REFRESH_TOKEN = "refresh_token"
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")

#: Every kind accepted by :meth:`AuthServer.fail_next`.
FAILURE_KINDS = frozenset(
    {
        "500",
        "503",
        "timeout",
        "junk",
        "huge",
        "gzip_bomb",
        "no_access_token",
        "wrong_types",
        "negative_expiry",
        "huge_expiry",
        "no_refresh_token",
        "oauth_error",
        "bad_error",
        "close",
        "custom",
        "override",
        "drip",
    }
)

#: Size of the body sent for the "huge" failure kind.
HUGE_BODY_BYTES = 2 * 1024 * 1024
#: How far the "gzip_bomb" body inflates, in MiB (the compressed body stays far below 1 MiB).
GZIP_BOMB_INFLATED_MIB = 128
#: Largest request body the server reads; anything bigger is answered with 413.
MAX_REQUEST_BODY = 1024 * 1024

#: Every AuthServer created in this process, for the suite-wide leak check.
INSTANCES: weakref.WeakSet[AuthServer] = weakref.WeakSet()

# Form fields whose values are secrets: they are added to AuthServer.issued when received.
_SECRET_FIELDS = (
    "client_secret",
    "code",
    "code_verifier",
    "refresh_token",
    "subject_token",
    "actor_token",
    "assertion",
    "token",
)
# Parameters that may legitimately repeat in a token request (RFC 8693 §2.1, RFC 8707 §2).
_REPEATABLE = frozenset({"resource", "audience"})
# RFC 7636 §4.1: code_verifier = 43*128unreserved.
_VERIFIER_RE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
# RFC 7636 §4.2: S256 challenge = BASE64URL(SHA256(verifier)) without padding = 43 characters.
_S256_CHALLENGE_RE = re.compile(r"[A-Za-z0-9\-_]{43}")


@dataclass
class Client:
    """A registered OAuth client (RFC 6749 §2)."""

    client_id: str
    client_secret: str | None  # None for a public client
    auth_method: str = "client_secret_basic"  # or "client_secret_post" or "none"
    redirect_uris: tuple[str, ...] = ("http://127.0.0.1/callback",)


@dataclass
class RecordedRequest:
    """One HTTP request as received by the server, before any validation."""

    method: str
    path: str  # path component only, without the query
    headers: dict[str, str]  # lowercased names
    form: dict[str, list[str]]  # parsed x-www-form-urlencoded body (empty for GET)
    time: float  # time.monotonic() on receipt
    query: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    failure: str | None = None  # the fail_next kind applied to this request, if any


@dataclass(frozen=True)
class ServerTLS:
    """Opt-in HTTPS: ``server`` is the server side's context (its certificate and key);
    ``client`` is the context the test harness itself uses to call the server (``authorize``,
    ``introspect``), trusting the CA that issued that certificate."""

    server: ssl.SSLContext
    client: ssl.SSLContext


class AuthorizeError(Exception):
    """The authorization endpoint answered with something other than a redirect."""

    def __init__(self, status: int, body: str) -> None:
        """Keep the HTTP status and the response body for the test to inspect."""
        super().__init__(f"authorization endpoint answered HTTP {status}: {body}")
        self.status = status
        self.body = body


class _OAuthError(Exception):
    """An OAuth error response (RFC 6749 §5.2) raised while handling a request."""

    def __init__(self, status: int, error: str, description: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.description = description


def _invalid_client(description: str = "client authentication failed") -> _OAuthError:
    # RFC 6749 §5.2: invalid_client is answered with 401.
    return _OAuthError(401, "invalid_client", description)


@dataclass
class _Response:
    """What the handler writes back; ``close`` drops the connection without answering."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    #: When > 0, the headers go out at once and then the body one byte every ``drip`` seconds.
    drip: float = 0.0


@dataclass
class _Code:
    client_id: str
    redirect_uri: str | None  # None when the authorization request omitted it
    code_challenge: str
    scope: str | None
    resources: list[str]
    user: str
    expires_at: float
    used: bool = False
    grant_id: str | None = None


@dataclass
class _Grant:
    grant_id: str
    user: str
    client_id: str
    scope: str | None
    resources: list[str]
    revoked: bool = False


@dataclass
class _AccessToken:
    grant_id: str
    scope: str | None
    expires_at: float | None
    resources: list[str]
    audiences: list[str]
    grant_type: str
    revoked: bool = False


@dataclass
class _RefreshToken:
    grant_id: str
    client_id: str
    rotated: bool = False
    revoked: bool = False


def _json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    # RFC 6749 §5.1: token responses carry Cache-Control: no-store and Pragma: no-cache.
    all_headers = {
        "Content-Type": "application/json;charset=UTF-8",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
    }
    all_headers.update(headers or {})
    return _Response(status, json.dumps(payload).encode("utf-8"), all_headers)


def _error_response(err: _OAuthError) -> _Response:
    payload = {"error": err.error}
    if err.description:
        payload["error_description"] = err.description
    headers = {}
    if err.status == 401:
        # RFC 6749 §5.2: a 401 carries WWW-Authenticate.
        headers["WWW-Authenticate"] = 'Basic realm="authserver"'
    return _json_response(err.status, payload, headers)


# RFC 8693 §3 token type identifiers this server understands.
_TOKEN_TYPES = frozenset(
    {
        TOKEN_TYPE_ACCESS_TOKEN,
        "urn:ietf:params:oauth:token-type:refresh_token",
        "urn:ietf:params:oauth:token-type:id_token",
        "urn:ietf:params:oauth:token-type:jwt",
    }
)
_CLIENT_FIELDS = frozenset({"grant_type", "client_id", "client_secret"})
# RFC 8693 §2.1: every parameter a token exchange request may carry.
_TOKEN_EXCHANGE_FIELDS = _CLIENT_FIELDS | {
    "subject_token",
    "subject_token_type",
    "requested_token_type",
    "audience",
    "resource",
    "scope",
    "actor_token",
    "actor_token_type",
}
# Entra on-behalf-of (jwt-bearer) request parameters.
_JWT_BEARER_FIELDS = _CLIENT_FIELDS | {"assertion", "requested_token_use", "scope"}


def _only_fields(form: dict[str, list[str]], allowed: frozenset[str]) -> None:
    unknown = sorted(set(form) - allowed)
    if unknown:
        raise _OAuthError(400, "invalid_request", f"unknown parameter {unknown[0]}")


def _param(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _basic_credentials(headers: dict[str, str]) -> tuple[str, str] | None:
    """Decode HTTP Basic client credentials per RFC 6749 §2.3.1.

    The client id and secret are each form-urlencoded before being joined with ":" and
    base64-encoded, so they are form-urldecoded here after splitting on the first ":".
    Returns None when there is no Basic header; raises invalid_client when it is malformed.
    """
    authorization = headers.get("authorization")
    if authorization is None:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise _invalid_client("unsupported authorization scheme")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise _invalid_client("malformed Basic credentials") from None
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        raise _invalid_client("malformed Basic credentials")
    return unquote_plus(raw_id), unquote_plus(raw_secret)


def _s256(verifier: str) -> str:
    """BASE64URL-ENCODE(SHA256(ASCII(code_verifier))) per RFC 7636 §4.2."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _append_query(uri: str, params: dict[str, str]) -> str:
    # RFC 6749 §3.1.2: keep the redirect URI's own query component and add ours to it.
    separator = "&" if "?" in uri else "?"
    return uri + separator + urlencode(params)


def _login_page(query: dict[str, list[str]]) -> _Response:
    """A sign-in page for a browser: the authorization request's parameters carried in hidden
    fields, a user name, and Allow / Deny (which GET /authorize again with the user's answer)."""
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
        for name, values in query.items()
        for value in values
    )
    body = (
        "<!doctype html><html><head><title>Sign in - test authorization server</title></head><body>"
        "<h1>Sign in to the test authorization server</h1>"
        f'<form method="get" action="/authorize">{hidden}'
        '<label>User name <input type="text" name="login_hint_user" autofocus></label> '
        '<button type="submit" id="allow" name="decision" value="allow">Allow</button> '
        '<button type="submit" id="deny" name="test_deny" value="1">Deny</button>'
        "</form></body></html>"
    ).encode()
    return _Response(200, body, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})


def _scope_set(scope: str | None) -> set[str]:
    return set(scope.split()) if scope else set()


@functools.cache
def _gzip_bomb() -> bytes:
    """A gzip body well under 1 MiB that inflates to GZIP_BOMB_INFLATED_MIB MiB of JSON."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31 = gzip container
    chunk = b"a" * (1024 * 1024)
    parts = [compressor.compress(b'{"token_type": "Bearer", "access_token": "')]
    parts.extend(compressor.compress(chunk) for _ in range(GZIP_BOMB_INFLATED_MIB))
    parts.append(compressor.compress(b'"}'))
    parts.append(compressor.flush())
    return b"".join(parts)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its AuthServer and can cut open connections on stop."""

    daemon_threads = True

    def __init__(self, auth: AuthServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.auth = auth
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def server_bind(self) -> None:
        """Bind without HTTPServer's socket.getfqdn() lookup, which can stall on bad DNS."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, connection: socket.socket) -> None:
        """Remember an accepted connection so that stop() can shut it down."""
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        """Forget a connection its handler has finished with."""
        with self._connections_lock:
            self._connections.discard(connection)

    def shutdown_connections(self) -> None:
        """Shut down every open connection so idle keep-alive handlers return at once."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that went away mid-answer (the tests provoke that)."""


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, hands it to the AuthServer and writes the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: _HTTPServer
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def setup(self) -> None:
        """Track the connection for stop(); over TLS, finish the handshake on this thread (a
        client that refuses the certificate fails here, quietly, without holding the server)."""
        super().setup()
        self.server.track(self.connection)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def finish(self) -> None:
        """Untrack the connection."""
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Do not log every request to stderr."""

    def do_GET(self) -> None:
        """Handle GET."""
        self._dispatch()

    def do_POST(self) -> None:
        """Handle POST."""
        self._dispatch()

    def _dispatch(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._write(_Response(411, b"Content-Length required\n"))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_REQUEST_BODY:
            self.close_connection = True
            self._write(_Response(413, b"request body too large\n"))
            return
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = self.server.auth._handle(self.command, self.path, headers, body)
        if response.close:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._write(response)

    def _write(self, response: _Response) -> None:
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if response.drip > 0:
                self._drip(response)
                return
            self.wfile.write(response.body)
            self.wfile.flush()
        except OSError:  # the client went away (BrokenPipe, ConnectionReset, ...)
            self.close_connection = True

    def _drip(self, response: _Response) -> None:
        """Headers now, then one body byte every ``response.drip`` seconds (a slow-loris answer)."""
        self.wfile.flush()
        stopping = self.server.auth._stop_event
        for index in range(len(response.body)):
            if stopping.wait(response.drip):
                self.close_connection = True  # stopping: drop the rest unanswered
                return
            self.wfile.write(response.body[index : index + 1])
            self.wfile.flush()


class AuthServer:
    """An OAuth 2.0 authorization server on 127.0.0.1 with a random port.

    All state lives behind one lock; every request is handled on its own daemon thread.
    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        access_ttl: int | None = 3600,
        rotate_refresh_tokens: bool = True,
        revoke_grant_on_reuse: bool = True,
        issue_refresh_token: bool = True,
        tls: ServerTLS | None = None,
    ) -> None:
        """Configure token lifetimes and refresh-token policy; nothing listens until start().
        ``tls`` serves HTTPS instead of HTTP (``base_url`` is then https)."""
        self.access_ttl = access_ttl
        self.tls = tls
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.revoke_grant_on_reuse = revoke_grant_on_reuse
        self.issue_refresh_token = issue_refresh_token
        #: Lifetime of authorization codes in seconds (RFC 6749 §4.1.2 recommends <= 10 min).
        self.code_ttl: float = 60.0
        #: Subject tokens (token exchange) and assertions (jwt-bearer) accepted, mapped to users.
        self.exchange_users: dict[str, str] = {}
        #: Token exchange answers carry a refresh token too (RFC 8693 section 2.2.1 allows one).
        self.exchange_refresh_token = False
        #: When set, token exchange answers carry this issued_token_type whatever was requested.
        self.issued_token_type_override: str | None = None
        #: "500" or "503" makes /revoke answer with that status until reset to None.
        self.fail_revocation: str | None = None
        #: Exceptions raised by the server's own code while handling requests (should stay empty).
        self.internal_errors: list[BaseException] = []

        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None

        self._clients: dict[str, Client] = {}
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}
        self._access_tokens: dict[str, _AccessToken] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._failures: list[tuple[str, dict[str, Any]]] = []
        self._requests: list[RecordedRequest] = []
        self._issued: set[str] = set()
        self._revoked: list[tuple[str, str | None]] = []
        #: Called with each /token request before it is answered (tests use it to act "meanwhile").
        self.before_token_response: Callable[[RecordedRequest], None] | None = None
        #: When True, /authorize without ``login_hint_user`` answers with a sign-in page (a user
        #: name field, Allow and Deny buttons) that a real browser goes through.
        self.login_page = False
        #: Every redirect /authorize answered with (its Location), in order.
        self.redirects: list[str] = []
        INSTANCES.add(self)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> AuthServer:
        """Bind a random loopback port and serve on a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("AuthServer already started")
        self._stop_event.clear()
        httpd = _HTTPServer(self)
        port = httpd.server_address[1]
        self._base_url = f"http://127.0.0.1:{port}"
        if self.tls is not None:
            # The handshake runs on each connection's handler thread (_Handler.setup).
            httpd.socket = self.tls.server.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
            self._base_url = f"https://127.0.0.1:{port}"
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"authserver-{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and cut open connections; idempotent.

        Returns promptly even while a "timeout" failure is sleeping: that sleep waits on an
        event set here, and the sleeping request is then dropped without an answer.
        """
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stop_event.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.shutdown_connections()
        if thread is not None:
            thread.join(timeout=1)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> AuthServer:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    # ----------------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; only available once started."""
        if self._base_url is None:
            raise RuntimeError("AuthServer not started")
        return self._base_url

    @property
    def issuer(self) -> str:
        """The issuer identifier (RFC 8414 §2), equal to base_url."""
        return self.base_url

    @property
    def authorization_endpoint(self) -> str:
        """URL of the authorization endpoint."""
        return self.base_url + "/authorize"

    @property
    def token_endpoint(self) -> str:
        """URL of the token endpoint."""
        return self.base_url + "/token"

    @property
    def revocation_endpoint(self) -> str:
        """URL of the revocation endpoint."""
        return self.base_url + "/revoke"

    @property
    def introspection_endpoint(self) -> str:
        """URL of the introspection endpoint (RFC 7662)."""
        return self.base_url + "/introspect"

    # ----------------------------------------------------------------- configuration

    def add_client(self, client: Client) -> Client:
        """Register a client; its secret counts as issued."""
        if client.auth_method not in AUTH_METHODS:
            raise ValueError(f"unknown auth_method {client.auth_method!r}")
        if (client.auth_method == "none") != (client.client_secret is None):
            raise ValueError("a client has a secret exactly when its auth_method is not 'none'")
        with self._lock:
            self._clients[client.client_id] = client
            if client.client_secret is not None:
                self._issued.add(client.client_secret)
        return client

    def new_client(
        self,
        auth_method: str = "client_secret_basic",
        redirect_uri: str = "http://127.0.0.1/callback",
    ) -> Client:
        """Register and return a client with a random id and (unless public) a random secret."""
        secret = None if auth_method == "none" else secrets.token_urlsafe(32)
        client = Client(
            client_id="client_" + secrets.token_urlsafe(8),
            client_secret=secret,
            auth_method=auth_method,
            redirect_uris=(redirect_uri,),
        )
        return self.add_client(client)

    def fail_next(self, kind: str, count: int = 1, **options: Any) -> None:
        """Queue misbehaviour for the next ``count`` requests to /token (only /token).

        Kinds producing an unusable answer ("500", "503", "junk", "huge", "gzip_bomb",
        "no_access_token", "wrong_types", "oauth_error", "bad_error", "close") leave the server
        state untouched: the code or refresh token in the request is not consumed. "timeout"
        (sleep ``seconds``, default 5), "negative_expiry", "huge_expiry" and "no_refresh_token"
        process the request normally; "no_refresh_token" neither mints nor rotates a refresh
        token. Options: ``seconds`` (timeout), ``status``/``error``/``description``
        (oauth_error), ``retry_after`` (adds a Retry-After header to "500"/"503"), ``delay``
        (any kind: wait that many seconds before answering). "override" processes the request
        normally, then sets the successful answer's fields to ``fields`` (a dict; None removes one).
        "drip" processes the request normally (a refresh token is used and rotated) and sends the
        headers at once, then the body one byte every ``seconds`` (default 1).
        """
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {sorted(FAILURE_KINDS)}")
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._failures.extend((kind, dict(options)) for _ in range(count))

    def issue_user_token(self, user: str, ttl: float) -> str:
        """An access token of ``user`` that expires ``ttl`` seconds from now (wall clock): a
        subject token or assertion the exchange grants accept until then, and refuse after."""
        with self._lock:
            client = Client("user-tokens", None, "none")
            grant = self._new_grant(user, client, None, [])
            saved, self.access_ttl = self.access_ttl, None
            try:
                token = self._mint_access_token(grant, None, GRANT_AUTHORIZATION_CODE)
            finally:
                self.access_ttl = saved
            self._access_tokens[token].expires_at = time.time() + ttl
            return token

    def issue_grant(self, user: str, client: Client, scope: str | None = None) -> tuple[str, str]:
        """(access token, refresh token) of a new grant of ``user`` to ``client``, as a code
        exchange would give: for tests that load many connected users at once."""
        with self._lock:
            grant = self._new_grant(user, client, scope, [])
            access = self._mint_access_token(grant, scope, GRANT_AUTHORIZATION_CODE)
            return access, self._mint_refresh_token(grant)

    def revoke_user(self, user: str) -> None:
        """Invalidate every refresh token of ``user``; the next refresh gets invalid_grant."""
        with self._lock:
            for record in self._refresh_tokens.values():
                if self._grants[record.grant_id].user == user:
                    record.revoked = True

    # ----------------------------------------------------------------- inspection

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received, to every endpoint, in arrival order."""
        with self._lock:
            return list(self._requests)

    def token_requests(self, grant_type: str | None = None) -> list[RecordedRequest]:
        """Requests to /token, optionally only those with the given grant_type."""
        return [
            request
            for request in self.requests
            if request.path == "/token"
            and (grant_type is None or _param(request.form, "grant_type") == grant_type)
        ]

    @property
    def issued(self) -> set[str]:
        """A snapshot of every secret minted or received: codes, tokens, client secrets, ..."""
        with self._lock:
            return set(self._issued)

    @property
    def revoked(self) -> list[tuple[str, str | None]]:
        """(token, token_type_hint) of every revocation request the server accepted."""
        with self._lock:
            return list(self._revoked)

    def access_token_info(self, token: str) -> dict[str, Any] | None:
        """Details of a live access token, or None if unknown, revoked or expired."""
        with self._lock:
            record = self._live_access_token(token)
            if record is None:
                return None
            grant = self._grants[record.grant_id]
            return {
                "user": grant.user,
                "client_id": grant.client_id,
                "scope": record.scope,
                "grant": record.grant_id,
                "expires_at": record.expires_at,
                "resource": list(record.resources),
                "audience": list(record.audiences),
                "grant_type": record.grant_type,
            }

    def refresh_token_live(self, token: str) -> bool:
        """Whether ``token`` is a refresh token that would be accepted right now."""
        with self._lock:
            record = self._refresh_tokens.get(token)
            return (
                record is not None
                and not record.rotated
                and not record.revoked
                and not self._grants[record.grant_id].revoked
            )

    # ----------------------------------------------------------------- user agent

    def authorize(self, authorization_url: str, user: str = "alice", *, deny: bool = False) -> dict[str, str]:
        """Play the user agent: GET the authorization URL and return the redirect's query.

        The request is a real HTTP GET with redirects not followed. ``user`` is passed to the
        server as the extra query parameter ``login_hint_user`` and ``deny`` as ``test_deny``.
        Returns the parsed query of the 302 Location (``code``, ``state``, ``iss``; or
        ``error=access_denied``, ``state``, ``iss``). Raises AuthorizeError on any other answer.
        """
        parts = urlsplit(authorization_url)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            raise ValueError(f"not an http URL: {authorization_url!r}")
        query = [
            (name, value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
            if name not in ("login_hint_user", "test_deny")
        ]
        query.append(("login_hint_user", user))
        if deny:
            query.append(("test_deny", "1"))
        connection = self._connection(parts.hostname, parts.port or 80)
        try:
            connection.request("GET", f"{parts.path or '/'}?{urlencode(query)}")
            response = connection.getresponse()
            body = response.read().decode("utf-8", errors="replace")
            location = response.getheader("Location")
        finally:
            connection.close()
        if response.status != 302 or location is None:
            raise AuthorizeError(response.status, body)
        return {
            name: values[0]
            for name, values in parse_qs(urlsplit(location).query, keep_blank_values=True).items()
        }

    def _connection(self, host: str, port: int | None) -> http.client.HTTPConnection:
        """A connection from the test harness to this server (HTTPS when it serves TLS)."""
        if self.tls is not None:
            return http.client.HTTPSConnection(host, port, timeout=10, context=self.tls.client)
        return http.client.HTTPConnection(host, port, timeout=10)

    # ----------------------------------------------------------------- request handling

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Response:
        """Record a request and route it; runs on the handler thread."""
        parts = urlsplit(target)
        path = parts.path
        query = parse_qs(parts.query, keep_blank_values=True)
        form: dict[str, list[str]] = {}
        if method == "POST":
            form = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        request = RecordedRequest(
            method=method,
            path=path,
            headers=headers,
            form=form,
            time=time.monotonic(),
            query=query,
            body=body,
        )
        with self._lock:
            self._requests.append(request)
            if path in ("/token", "/revoke", "/introspect"):
                self._note_secrets(form, headers)
        try:
            if path in (
                "/.well-known/oauth-authorization-server",
                "/.well-known/openid-configuration",
            ):
                if method != "GET":
                    return _Response(405, b"method not allowed\n", {"Allow": "GET"})
                return _json_response(200, self._metadata())
            if path == "/authorize":
                if method != "GET":
                    return _Response(405, b"method not allowed\n", {"Allow": "GET"})
                with self._lock:
                    return self._authorize_endpoint(query)
            if path == "/token":
                if method != "POST":
                    return _Response(405, b"method not allowed\n", {"Allow": "POST"})
                return self._token_endpoint(request)
            if path == "/revoke":
                if method != "POST":
                    return _Response(405, b"method not allowed\n", {"Allow": "POST"})
                with self._lock:
                    return self._revocation_endpoint(request)
            if path == "/introspect":
                if method != "POST":
                    return _Response(405, b"method not allowed\n", {"Allow": "POST"})
                with self._lock:
                    return self._introspection_endpoint(request)
            return _Response(404, b"not found\n", {"Content-Type": "text/plain"})
        except _OAuthError as err:
            return _error_response(err)
        except Exception as exc:  # a bug in this server: answer 500 and keep it for the test
            with self._lock:
                self.internal_errors.append(exc)
            return _json_response(500, {"error": "server_error"})

    def _note_secrets(self, form: dict[str, list[str]], headers: dict[str, str]) -> None:
        for name in _SECRET_FIELDS:
            self._issued.update(value for value in form.get(name, []) if value)
        try:
            credentials = _basic_credentials(headers)
        except _OAuthError:
            credentials = None
        if credentials is not None and credentials[1]:
            self._issued.add(credentials[1])

    def _metadata(self) -> dict[str, Any]:
        # RFC 8414 §2/§3: authorization server metadata.
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "revocation_endpoint": self.revocation_endpoint,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": [
                GRANT_AUTHORIZATION_CODE,
                GRANT_REFRESH_TOKEN,
                GRANT_TOKEN_EXCHANGE,
                GRANT_JWT_BEARER,
            ],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
            # RFC 9207 §3: the authorization response carries iss.
            "authorization_response_iss_parameter_supported": True,
        }

    # ----------------------------------------------------------------- /authorize

    def _authorize_endpoint(self, query: dict[str, list[str]]) -> _Response:
        """RFC 6749 §4.1.1 authorization request with PKCE (RFC 7636 §4.3); lock held."""
        for name, values in query.items():
            if len(values) > 1 and name != "resource":
                # RFC 6749 §3.1: parameters MUST NOT be included more than once.
                raise _OAuthError(400, "invalid_request", f"repeated parameter {name}")
        client = self._clients.get(_param(query, "client_id") or "")
        if client is None:
            # RFC 6749 §4.1.2.1: never redirect to an unverified URI; answer directly.
            raise _OAuthError(400, "invalid_request", "unknown client_id")
        redirect_uri = _param(query, "redirect_uri")
        if redirect_uri is None:
            # RFC 6749 §3.1.2.3: may be omitted only if exactly one URI is registered.
            if len(client.redirect_uris) != 1:
                raise _OAuthError(400, "invalid_request", "redirect_uri required")
            target = client.redirect_uris[0]
        elif redirect_uri in client.redirect_uris:  # exact string match, RFC 9700 §4.1.3
            target = redirect_uri
        else:
            raise _OAuthError(400, "invalid_request", "redirect_uri not registered")
        if _param(query, "response_type") != "code":
            raise _OAuthError(400, "unsupported_response_type", "only response_type=code")
        challenge = _param(query, "code_challenge")
        if challenge is None:
            raise _OAuthError(400, "invalid_request", "code_challenge required")
        if _param(query, "code_challenge_method") != "S256":
            raise _OAuthError(400, "invalid_request", "code_challenge_method must be S256")
        if not _S256_CHALLENGE_RE.fullmatch(challenge):
            raise _OAuthError(400, "invalid_request", "malformed S256 code_challenge")

        if self.login_page and _param(query, "login_hint_user") is None and not _param(query, "test_deny"):
            return _login_page(query)
        params: dict[str, str] = {}
        if _param(query, "test_deny"):
            params["error"] = "access_denied"  # RFC 6749 §4.1.2.1
        else:
            code = "code_" + secrets.token_urlsafe(32)
            self._codes[code] = _Code(
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                code_challenge=challenge,
                scope=_param(query, "scope"),
                resources=list(query.get("resource", [])),
                user=_param(query, "login_hint_user") or "alice",
                expires_at=time.time() + self.code_ttl,
            )
            self._issued.add(code)
            params["code"] = code
        state = _param(query, "state")
        if state is not None:
            params["state"] = state
            self._issued.add(state)  # a state is a secret too (RFC 6749 section 10.12)
        params["iss"] = self.issuer  # RFC 9207 §2, on success and error responses
        location = _append_query(target, params)
        self.redirects.append(location)
        return _Response(302, b"", {"Location": location})

    # ----------------------------------------------------------------- /token

    def _token_endpoint(self, request: RecordedRequest) -> _Response:
        """RFC 6749 §3.2 token endpoint, with fault injection first."""
        hook = self.before_token_response
        if hook is not None:
            hook(request)
        with self._lock:
            kind, options = self._failures.pop(0) if self._failures else (None, {})
            request.failure = kind
        if kind is not None:
            early = self._failure_response(kind, options, request)
            if early is not None:
                return early
        with self._lock:
            status, payload = self._token_request(request, suppress_refresh=kind == "no_refresh_token")
        if status == 200 and kind == "negative_expiry":
            payload["expires_in"] = -5
        elif status == 200 and kind == "huge_expiry":
            payload["expires_in"] = 10**12
        elif status == 200 and kind == "override":
            for name, value in dict(options.get("fields", {})).items():
                if value is None:
                    payload.pop(name, None)
                else:
                    payload[name] = value
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="authserver"'  # RFC 6749 §5.2
        response = _json_response(status, payload, headers)
        if kind == "drip":
            response.drip = float(options.get("seconds", 1.0))
        return response

    def _failure_response(
        self, kind: str, options: dict[str, Any], request: RecordedRequest
    ) -> _Response | None:
        """The answer for a failure kind, or None when the request is then handled normally."""
        payload: dict[str, Any]
        if "delay" in options and self._stop_event.wait(float(options["delay"])):
            return _Response(close=True)  # stopping
        if kind == "timeout":
            if self._stop_event.wait(float(options.get("seconds", 5))):
                return _Response(close=True)  # stopping: drop the request unanswered
            return None
        if kind in ("negative_expiry", "huge_expiry", "no_refresh_token", "override", "drip"):
            return None
        if kind in ("500", "503"):
            headers = {}
            if "retry_after" in options:
                headers["Retry-After"] = str(options["retry_after"])
            error = "server_error" if kind == "500" else "temporarily_unavailable"
            return _json_response(int(kind), {"error": error}, headers)
        if kind == "close":
            return _Response(close=True)
        if kind == "custom":  # exactly the status, body and headers given (fuzzing)
            headers = dict(options.get("headers", {"Content-Type": "application/json"}))
            return _Response(int(options.get("status", 200)), bytes(options.get("body", b"")), headers)
        if kind == "junk":
            body = b"<html><body>502 Bad Gateway - upstream said {not json</body></html>"
            headers = {"Content-Type": str(options.get("content_type", "application/json"))}
            return _Response(200, body, headers)
        if kind == "huge":
            token = "at_huge_" + secrets.token_urlsafe(32)
            with self._lock:
                self._issued.add(token)
            payload = {"access_token": token, "token_type": "Bearer", "padding": ""}
            overhead = len(json.dumps(payload).encode())
            payload["padding"] = "x" * (HUGE_BODY_BYTES - overhead)
            return _json_response(200, payload)
        if kind == "gzip_bomb":
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            return _Response(200, _gzip_bomb(), headers)
        if kind == "no_access_token":
            return _json_response(200, {"token_type": "Bearer", "expires_in": 3600})
        if kind == "wrong_types":
            number = secrets.randbelow(10**12)
            payload = {
                "access_token": number,
                "token_type": "Bearer",
                "expires_in": "3600",
            }
            return _json_response(200, payload)
        echo = self._echo_secrets(request)
        if kind == "oauth_error":
            description = options.get("description", f"request rejected; you sent {echo}")
            payload = {
                "error": options.get("error", "invalid_grant"),
                "error_description": description,
            }
            return _json_response(int(options.get("status", 400)), payload)
        if kind == "bad_error":
            return _json_response(400, {"error": f"<script>{echo}</script>"})
        raise AssertionError(f"unhandled failure kind {kind}")  # pragma: no cover

    @staticmethod
    def _echo_secrets(request: RecordedRequest) -> str:
        """Secret values of a request as free text, to prove callers never surface them."""
        pieces = [
            f"{name}={value}" for name in _SECRET_FIELDS for value in request.form.get(name, []) if value
        ]
        try:
            credentials = _basic_credentials(request.headers)
        except _OAuthError:
            credentials = None
        if credentials is not None:
            pieces.append(f"client_secret={credentials[1]}")
        return " ".join(pieces) or "nothing secret"

    def _token_request(
        self, request: RecordedRequest, *, suppress_refresh: bool
    ) -> tuple[int, dict[str, Any]]:
        """Validate and answer a token request; lock held. Returns (status, JSON payload)."""
        try:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/x-www-form-urlencoded":
                # RFC 6749 §3.2: the request uses application/x-www-form-urlencoded.
                raise _OAuthError(400, "invalid_request", "form-urlencoded body required")
            form = request.form
            for name, values in form.items():
                if len(values) > 1 and name not in _REPEATABLE:
                    # RFC 6749 §3.2: parameters MUST NOT be included more than once.
                    raise _OAuthError(400, "invalid_request", f"repeated parameter {name}")
            client = self._authenticate_client(form, request.headers)
            grant_type = _param(form, "grant_type")
            if grant_type is None:
                raise _OAuthError(400, "invalid_request", "grant_type required")
            if grant_type == GRANT_AUTHORIZATION_CODE:
                return 200, self._grant_authorization_code(client, form, suppress_refresh)
            if grant_type == GRANT_REFRESH_TOKEN:
                return 200, self._grant_refresh_token(client, form, suppress_refresh)
            if grant_type == GRANT_TOKEN_EXCHANGE:
                return 200, self._grant_token_exchange(client, form)
            if grant_type == GRANT_JWT_BEARER:
                return 200, self._grant_jwt_bearer(client, form, suppress_refresh)
            raise _OAuthError(400, "unsupported_grant_type")  # RFC 6749 §5.2
        except _OAuthError as err:
            payload: dict[str, Any] = {"error": err.error}
            if err.description:
                payload["error_description"] = err.description
            return err.status, payload

    def _authenticate_client(self, form: dict[str, list[str]], headers: dict[str, str]) -> Client:
        """Authenticate the client with exactly the method it registered (RFC 6749 §2.3)."""
        form_id = _param(form, "client_id")
        form_secret = _param(form, "client_secret")
        basic = _basic_credentials(headers)
        client_id: str | None
        secret: str | None
        if basic is not None:
            if form_secret is not None:
                # RFC 6749 §2.3: MUST NOT use more than one authentication method per request.
                raise _OAuthError(400, "invalid_request", "more than one client authentication")
            client_id, secret = basic
            method = "client_secret_basic"
            if form_id is not None and form_id != client_id:
                raise _invalid_client("client_id does not match the Basic credentials")
        elif form_secret is not None:
            client_id, secret, method = form_id, form_secret, "client_secret_post"
        else:
            # RFC 6749 §2.3.1 / §3.2.1: a public client only identifies itself with client_id.
            client_id, secret, method = form_id, None, "none"
        client = self._clients.get(client_id or "")
        if client is None or client.auth_method != method:
            raise _invalid_client()
        if method != "none":
            expected = (client.client_secret or "").encode()
            if secret is None or not hmac.compare_digest(secret.encode(), expected):
                raise _invalid_client()
        return client

    def _new_grant(self, user: str, client: Client, scope: str | None, resources: list[str]) -> _Grant:
        grant = _Grant("grant_" + secrets.token_urlsafe(8), user, client.client_id, scope, resources)
        self._grants[grant.grant_id] = grant
        return grant

    def _mint_access_token(
        self,
        grant: _Grant,
        scope: str | None,
        grant_type: str,
        resources: list[str] | None = None,
        audiences: list[str] | None = None,
    ) -> str:
        token = "at_" + secrets.token_urlsafe(32)
        expires_at = None if self.access_ttl is None else time.time() + self.access_ttl
        self._access_tokens[token] = _AccessToken(
            grant_id=grant.grant_id,
            scope=scope,
            expires_at=expires_at,
            resources=list(resources if resources is not None else grant.resources),
            audiences=list(audiences or []),
            grant_type=grant_type,
        )
        self._issued.add(token)
        return token

    def _mint_refresh_token(self, grant: _Grant) -> str:
        token = "rt_" + secrets.token_urlsafe(32)
        self._refresh_tokens[token] = _RefreshToken(grant.grant_id, grant.client_id)
        self._issued.add(token)
        return token

    def _bearer_payload(self, access_token: str, scope: str | None) -> dict[str, Any]:
        # RFC 6749 §5.1 successful response.
        payload: dict[str, Any] = {"access_token": access_token, "token_type": "Bearer"}
        if self.access_ttl is not None:
            payload["expires_in"] = self.access_ttl
        if scope is not None:
            payload["scope"] = scope
        return payload

    def _revoke_grant(self, grant_id: str) -> None:
        """Kill a grant: every access and refresh token minted under it stops working."""
        self._grants[grant_id].revoked = True

    def _live_access_token(self, token: str) -> _AccessToken | None:
        record = self._access_tokens.get(token)
        if record is None or record.revoked or self._grants[record.grant_id].revoked:
            return None
        if record.expires_at is not None and time.time() >= record.expires_at:
            return None
        return record

    def _grant_authorization_code(
        self, client: Client, form: dict[str, list[str]], suppress_refresh: bool
    ) -> dict[str, Any]:
        """RFC 6749 §4.1.3 access token request, with PKCE verification (RFC 7636 §4.5/§4.6)."""
        code = _param(form, "code")
        if not code:
            raise _OAuthError(400, "invalid_request", "code required")
        record = self._codes.get(code)
        if record is None:
            raise _OAuthError(400, "invalid_grant", "unknown authorization code")
        if record.used:
            # RFC 6749 §4.1.2: a reused code is denied and tokens issued from it SHOULD be
            # revoked (RFC 9700 §4.14.2 in spirit).
            if self.revoke_grant_on_reuse and record.grant_id is not None:
                self._revoke_grant(record.grant_id)
            raise _OAuthError(400, "invalid_grant", "authorization code already used")
        # Any presentation consumes the code, so a wrong verifier cannot be retried.
        record.used = True
        if record.client_id != client.client_id:
            raise _OAuthError(400, "invalid_grant", "code was issued to another client")
        if time.time() >= record.expires_at:
            raise _OAuthError(400, "invalid_grant", "authorization code expired")
        redirect_uri = _param(form, "redirect_uri")
        if record.redirect_uri is not None:
            # RFC 6749 §4.1.3: required and identical when the authorization request had it.
            if redirect_uri != record.redirect_uri:
                raise _OAuthError(400, "invalid_grant", "redirect_uri mismatch")
        elif redirect_uri is not None and redirect_uri not in client.redirect_uris:
            raise _OAuthError(400, "invalid_grant", "redirect_uri mismatch")
        verifier = _param(form, "code_verifier")
        if verifier is None:
            raise _OAuthError(400, "invalid_grant", "code_verifier required")  # RFC 7636 §4.6
        if not _VERIFIER_RE.fullmatch(verifier) or not hmac.compare_digest(
            _s256(verifier), record.code_challenge
        ):
            raise _OAuthError(400, "invalid_grant", "PKCE verification failed")  # RFC 7636 §4.6
        resources = form.get("resource", [])
        if record.resources and any(r not in record.resources for r in resources):
            # RFC 8707 §2.2: the resource must be one the authorization request named.
            raise _OAuthError(400, "invalid_target", "resource was not authorized")
        grant = self._new_grant(record.user, client, record.scope, list(record.resources))
        record.grant_id = grant.grant_id
        access = self._mint_access_token(
            grant, record.scope, GRANT_AUTHORIZATION_CODE, resources or record.resources
        )
        payload = self._bearer_payload(access, record.scope)
        if self.issue_refresh_token and not suppress_refresh:
            payload["refresh_token"] = self._mint_refresh_token(grant)
        return payload

    def _grant_refresh_token(
        self, client: Client, form: dict[str, list[str]], suppress_refresh: bool
    ) -> dict[str, Any]:
        """RFC 6749 §6 refresh, with rotation and reuse detection (RFC 9700 §4.14.2)."""
        token = _param(form, "refresh_token")
        if not token:
            raise _OAuthError(400, "invalid_request", "refresh_token required")
        record = self._refresh_tokens.get(token)
        if record is None:
            raise _OAuthError(400, "invalid_grant", "unknown refresh token")
        if record.client_id != client.client_id:
            # RFC 6749 §6: the refresh token must have been issued to the authenticated client.
            raise _OAuthError(400, "invalid_grant", "refresh token issued to another client")
        grant = self._grants[record.grant_id]
        if grant.revoked or record.revoked:
            raise _OAuthError(400, "invalid_grant", "refresh token revoked")
        if record.rotated:
            # RFC 9700 §4.14.2: a rotated-out refresh token came back, so either the client or
            # an attacker holds a stolen copy; revoke the whole grant.
            if self.revoke_grant_on_reuse:
                self._revoke_grant(grant.grant_id)
            raise _OAuthError(400, "invalid_grant", "refresh token reused")
        scope = _param(form, "scope")
        if scope is not None and not _scope_set(scope) <= _scope_set(grant.scope):
            # RFC 6749 §6: MUST NOT include any scope not originally granted.
            raise _OAuthError(400, "invalid_scope", "scope exceeds the original grant")
        resources = form.get("resource", [])
        if grant.resources and any(r not in grant.resources for r in resources):
            raise _OAuthError(400, "invalid_target", "resource was not authorized")  # RFC 8707
        effective_scope = scope if scope is not None else grant.scope
        access = self._mint_access_token(
            grant, effective_scope, GRANT_REFRESH_TOKEN, resources or grant.resources
        )
        payload = self._bearer_payload(access, effective_scope)
        if self.rotate_refresh_tokens and not suppress_refresh:
            record.rotated = True
            payload["refresh_token"] = self._mint_refresh_token(grant)
        # Without rotation no refresh_token is returned: the client keeps its current one.
        return payload

    def _subject_user(self, token: str) -> str | None:
        """The user behind a subject token or assertion: configured, or one of our tokens."""
        if token in self.exchange_users:
            return self.exchange_users[token]
        record = self._live_access_token(token)
        return None if record is None else self._grants[record.grant_id].user

    def _grant_token_exchange(self, client: Client, form: dict[str, list[str]]) -> dict[str, Any]:
        """RFC 8693 §2.1 token exchange request, answered per §2.2.1."""
        subject_token = _param(form, "subject_token")
        subject_token_type = _param(form, "subject_token_type")
        if not subject_token or not subject_token_type:
            raise _OAuthError(400, "invalid_request", "subject_token and subject_token_type required")
        if _param(form, "actor_token") and not _param(form, "actor_token_type"):
            # RFC 8693 §2.1: actor_token_type is REQUIRED when actor_token is present.
            raise _OAuthError(400, "invalid_request", "actor_token_type required")
        _only_fields(form, _TOKEN_EXCHANGE_FIELDS)
        requested = _param(form, "requested_token_type")
        for name, value in (("subject_token_type", subject_token_type), ("requested_token_type", requested)):
            if value is not None and value not in _TOKEN_TYPES:
                raise _OAuthError(400, "invalid_request", f"unsupported {name}")  # RFC 8693 §3
        if any(not value for name in ("audience", "resource") for value in form.get(name, [])):
            raise _OAuthError(400, "invalid_request", "empty audience or resource")
        user = self._subject_user(subject_token)
        if user is None:
            raise _OAuthError(400, "invalid_grant", "subject_token not accepted")
        scope = _param(form, "scope")
        resources = form.get("resource", [])
        audiences = form.get("audience", [])
        grant = self._new_grant(user, client, scope, list(resources))
        access = self._mint_access_token(grant, scope, GRANT_TOKEN_EXCHANGE, resources, audiences)
        payload = self._bearer_payload(access, scope)
        payload["issued_token_type"] = self.issued_token_type_override or requested or TOKEN_TYPE_ACCESS_TOKEN
        if self.exchange_refresh_token:
            payload["refresh_token"] = self._mint_refresh_token(grant)
        return payload

    def _grant_jwt_bearer(
        self, client: Client, form: dict[str, list[str]], suppress_refresh: bool
    ) -> dict[str, Any]:
        """Entra ID on-behalf-of: jwt-bearer grant with requested_token_use=on_behalf_of."""
        assertion = _param(form, "assertion")
        scope = _param(form, "scope")
        if not assertion or not scope:
            raise _OAuthError(400, "invalid_request", "assertion and scope required")
        if _param(form, "requested_token_use") != "on_behalf_of":
            raise _OAuthError(400, "invalid_request", "requested_token_use must be on_behalf_of")
        _only_fields(form, _JWT_BEARER_FIELDS)
        user = self._subject_user(assertion)
        if user is None:
            raise _OAuthError(400, "invalid_grant", "assertion not accepted")
        grant = self._new_grant(user, client, scope, [])
        access = self._mint_access_token(grant, scope, GRANT_JWT_BEARER)
        # Entra's answer: no issued_token_type; ext_expires_in next to expires_in.
        payload: dict[str, Any] = {"token_type": "Bearer", "scope": scope}
        if self.access_ttl is not None:
            payload["expires_in"] = self.access_ttl
            payload["ext_expires_in"] = self.access_ttl
        payload["access_token"] = access
        if self.issue_refresh_token and not suppress_refresh:
            payload["refresh_token"] = self._mint_refresh_token(grant)
        return payload

    # ----------------------------------------------------------------- /revoke

    def _revocation_endpoint(self, request: RecordedRequest) -> _Response:
        """RFC 7009 §2.1 revocation request; lock held."""
        if self.fail_revocation is not None:
            status = int(self.fail_revocation)
            error = "server_error" if status == 500 else "temporarily_unavailable"
            return _json_response(status, {"error": error})
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise _OAuthError(400, "invalid_request", "form-urlencoded body required")
        form = request.form
        client = self._authenticate_client(form, request.headers)
        token = _param(form, "token")
        if not token:
            raise _OAuthError(400, "invalid_request", "token required")
        hint = _param(form, "token_type_hint")
        self._revoked.append((token, hint))
        # RFC 7009 §2.1: the hint only speeds up lookup; search both kinds regardless.
        refresh = self._refresh_tokens.get(token)
        if refresh is not None and refresh.client_id == client.client_id:
            # RFC 7009 §2.1: revoking a refresh token SHOULD also revoke the grant's access tokens.
            self._revoke_grant(refresh.grant_id)
        access = self._access_tokens.get(token)
        if access is not None and self._grants[access.grant_id].client_id == client.client_id:
            access.revoked = True
        # RFC 7009 §2.2: 200 whether or not the token was known.
        return _Response(200, b"", {"Cache-Control": "no-store"})

    # ----------------------------------------------------------------- /introspect

    def _introspection_endpoint(self, request: RecordedRequest) -> _Response:
        """RFC 7662 §2.1 introspection request, authenticated as a client; lock held. Only the
        client a token was issued to learns that it is active (§2.2: otherwise "active": false)."""
        form = request.form
        client = self._authenticate_client(form, request.headers)
        token = _param(form, "token")
        if not token:
            raise _OAuthError(400, "invalid_request", "token required")
        access = self._live_access_token(token)
        if access is not None and self._grants[access.grant_id].client_id == client.client_id:
            grant = self._grants[access.grant_id]
            answer: dict[str, Any] = {"active": True, "token_type": "access_token", "sub": grant.user}
            answer["client_id"] = client.client_id
            if access.expires_at is not None:
                answer["exp"] = int(access.expires_at)
            return _json_response(200, answer)
        refresh = self._refresh_tokens.get(token)
        if (
            refresh is not None
            and refresh.client_id == client.client_id
            and not refresh.rotated
            and not refresh.revoked
            and not self._grants[refresh.grant_id].revoked
        ):
            grant = self._grants[refresh.grant_id]
            answer = {"active": True, "token_type": "refresh_token", "sub": grant.user}
            answer["client_id"] = client.client_id
            return _json_response(200, answer)
        return _json_response(200, {"active": False})

    def introspect(self, client: Client, token: str) -> dict[str, Any]:
        """Ask this server's RFC 7662 endpoint about ``token`` over HTTP, as ``client``
        (client_secret_basic or client_secret_post, as the client is registered)."""
        data = {"token": token}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if client.auth_method == "client_secret_basic":
            pair = f"{client.client_id}:{client.client_secret or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            data["client_id"] = client.client_id
            if client.client_secret is not None:
                data["client_secret"] = client.client_secret
        parts = urlsplit(self.introspection_endpoint)
        conn = self._connection(parts.hostname or "127.0.0.1", parts.port)
        try:
            conn.request("POST", parts.path, body=urlencode(data), headers=headers)
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        if answer.status != 200:
            raise AssertionError(f"introspection answered HTTP {answer.status}")
        found: dict[str, Any] = json.loads(body)
        return found

    def live_tokens(self, user: str) -> list[str]:
        """Every access and refresh token of ``user``'s grants that would be accepted now."""
        with self._lock:
            out = [t for t in self._access_tokens if self._live_access_token(t) is not None]
            out = [t for t in out if self._grants[self._access_tokens[t].grant_id].user == user]
            for token, record in self._refresh_tokens.items():
                grant = self._grants[record.grant_id]
                if grant.user == user and not (record.rotated or record.revoked or grant.revoked):
                    out.append(token)
            return out
