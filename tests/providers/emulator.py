"""A small loopback OAuth provider emulator: the base for provider quirk emulators.

Each provider module subclasses :class:`Emulator` and writes its token endpoint the way the
provider's public documentation describes it (where errors go, how the answer nests, which
body format and client authentication it takes). The base serves the authorization endpoint
(a 302 back to the redirect URI with a code), keeps codes, grants and tokens, records every
request, and reports every secret it minted to the leak check. Standard library only.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from tests import leakcheck

CLIENT_ID = "emulated-client"


@dataclass
class Request:
    """One request the emulator received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode()))

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data

    def basic(self) -> tuple[str, str] | None:
        value = self.headers.get("authorization", "")
        if not value.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(value[6:]).decode().partition(":")
        return user, password


@dataclass
class Grant:
    user: str
    scope: str
    refresh_token: str | None
    dead: bool = False


@dataclass
class Emulator:
    """A provider on 127.0.0.1. Subclasses implement ``token`` (and may add paths)."""

    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    requests: list[Request] = field(default_factory=list)
    codes: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)  # by refresh token
    lock: threading.Lock = field(default_factory=threading.Lock)
    minted: set[str] = field(default_factory=set)

    def start(self) -> Emulator:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                request = Request(
                    self.command,
                    parts.path,
                    dict(parse_qsl(parts.query)),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                with emulator.lock:
                    emulator.requests.append(request)
                    status, headers, body = emulator.route(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        leakcheck.add_secret(self.client_secret)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- what a test uses ------------------------------------------------------------------

    def authorize(self, authorization_url: str, user: str) -> dict[str, str]:
        """Play the browser: GET the authorization URL, return the redirect's query."""
        parts = urlsplit(authorization_url)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        try:
            connection.request("GET", f"{parts.path}?{parts.query}&emulated_user={user}")
            response = connection.getresponse()
            response.read()
            location = response.getheader("Location") or ""
        finally:
            connection.close()
        assert response.status == 302, response.status
        return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}

    def kill_grants(self, user: str) -> None:
        """The user revoked the app at the provider: every refresh token of theirs is dead."""
        with self.lock:
            for grant in self.grants.values():
                if grant.user == user:
                    grant.dead = True

    def token_requests(self, path: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and (path is None or r.path == path)]

    def authorization_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path == self.authorize_path]

    # -- serving ---------------------------------------------------------------------------

    provider: ClassVar[str] = ""  # the catalogue name it emulates
    # BuildAuthorizationURL's connection_params for a preset with per-connection endpoints.
    connection_params: ClassVar[dict[str, str]] = {}
    authorize_path: ClassVar[str] = "/authorize"
    token_path: ClassVar[str] = "/token"

    def endpoints(self) -> dict[str, str]:
        """The auth_broker keys that point the preset at this emulator."""
        return {
            "authorization_endpoint": self.base + self.authorize_path,
            "token_endpoint": self.base + self.token_path,
        }

    def route(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        if request.method == "GET" and request.path == self.authorize_path:
            return self.authorization(request)
        status, answer = self.token(request)
        return status, {"Content-Type": "application/json"}, json.dumps(answer).encode()

    def authorization(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        query = request.query
        code = self.mint("code")
        self.codes[code] = (query.get("emulated_user", ""), query)
        location = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query.get('state', '')})}"
        return 302, {"Location": location}, b""

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def mint(self, kind: str) -> str:
        value = f"{kind}-{secrets.token_urlsafe(18)}"
        leakcheck.add_secret(value)
        self.minted.add(value)
        return value

    def take_code(self, code: str | None) -> tuple[str, dict[str, str]] | None:
        return self.codes.pop(code or "", None)

    def new_grant(self, user: str, scope: str, refresh: bool = True) -> Grant:
        grant = Grant(user, scope, self.mint("refresh") if refresh else None)
        if grant.refresh_token:
            self.grants[grant.refresh_token] = grant
        return grant

    def use_refresh(self, refresh_token: str | None, rotate: bool = True) -> Grant | None:
        """The live grant of a refresh token (rotated out when ``rotate``), or None."""
        grant = self.grants.get(refresh_token or "")
        if grant is None or grant.dead:
            return None
        if rotate:
            del self.grants[grant.refresh_token or ""]
            grant.refresh_token = self.mint("refresh")
            self.grants[grant.refresh_token] = grant
        return grant
