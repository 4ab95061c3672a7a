"""A real OpenID Connect identity provider for tests, served over HTTP on 127.0.0.1.

It serves ``/.well-known/openid-configuration`` (OpenID Connect Discovery 1.0 section 4) and
``/jwks`` (RFC 7517 section 5) for keys generated at run time, and signs the tokens the tests
ask for. Only public keys are ever served. Like tests/authserver.py: stdlib HTTP server on a
daemon thread, every request recorded. It can be taken down (:meth:`IdentityProvider.go_down`:
refuse connections, or answer HTTP 500) and brought back on the same port.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, Key, RSAKey


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, idp: IdentityProvider, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.idp = idp

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no reverse-DNS lookup
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        if self.server.idp.failing == "refuse":
            # A connection opened before the outage: dropped unanswered, as by a dead server.
            self.close_connection = True
            return
        status, payload = self.server.idp._get(self.path)
        body = json.dumps(payload).encode()
        if self.server.idp.failing == "nested":
            body = b"[" * 200_000  # deeper than a JSON parser can recurse, far below 256 KiB
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class IdentityProvider:
    """Signs user tokens with RSA and EC keys and serves their public halves as a JWKS."""

    def __init__(self) -> None:
        self.keys: dict[str, Key] = {}
        self.requests: list[str] = []
        #: When set, the discovery document names this issuer instead of its own.
        self.discovery_issuer: str | None = None
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        #: None when serving; "500" answers every request with HTTP 500 (and records it);
        #: "refuse" while the listening socket is closed; "nested" (see go_down).
        self.failing: str | None = None

    def start(self) -> IdentityProvider:
        self._httpd = _Server(self, self._port)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def go_down(self, how: str) -> None:
        """An outage: "refuse" closes the listening socket (connections are refused), "500"
        keeps serving but answers every request with HTTP 500, "nested" answers 200 with a
        deeply nested JSON array."""
        if how == "refuse":
            self.failing = "refuse"
            self.stop()
        elif how in ("500", "nested"):
            self.failing = how
        else:
            raise ValueError(f"unknown outage {how!r}; expected 'refuse', '500' or 'nested'")

    def come_up(self) -> None:
        """End the outage: serve again, on the same port."""
        self.failing = None
        if self._httpd is None:
            self.start()

    @property
    def issuer(self) -> str:
        assert self._port, "not started"
        return f"http://127.0.0.1:{self._port}"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/jwks"

    @property
    def jwks_requests(self) -> int:
        with self._lock:
            return sum(1 for path in self.requests if path == "/jwks")

    def add_key(self, kind: str, kid: str, *, publish: bool = True) -> Key:
        """Generate an RSA (2048) or EC (P-256) key; publish it in the JWKS unless told not to."""
        key: Key = (
            RSAKey.generate_key(2048, {"kid": kid})
            if kind == "rsa"
            else ECKey.generate_key("P-256", {"kid": kid})
        )
        if publish:
            with self._lock:
                self.keys[kid] = key
        return key

    def _get(self, path: str) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(path)
            if self.failing == "500":
                return 500, {"error": "server_error"}
            if path == "/.well-known/openid-configuration":
                return 200, {
                    "issuer": self.discovery_issuer or self.issuer,
                    "jwks_uri": self.jwks_uri,
                    "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                }
            if path == "/jwks":
                return 200, {"keys": [k.as_dict(private=False) for k in self.keys.values()]}
        return 404, {"error": "not found"}

    def claims(self, user: str = "alice", **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": "broker",
            "sub": user,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(
        self, claims: dict[str, Any], kid: str, *, key: Key | None = None, alg: str | None = None
    ) -> str:
        """A JWS compact token over ``claims`` with the key ``kid`` (or ``key``, any key)."""
        signer = key or self.keys[kid]
        alg = alg or ("RS256" if isinstance(signer, RSAKey) else "ES256")
        return jwt.encode({"alg": alg, "kid": kid}, claims, signer, algorithms=[alg])

    @staticmethod
    def unsigned(claims: dict[str, Any], kid: str) -> str:
        """An ``alg: none`` token (RFC 7519 section 6)."""
        header = b64url(json.dumps({"alg": "none", "kid": kid, "typ": "JWT"}).encode())
        return f"{header}.{b64url(json.dumps(claims).encode())}."

    def hmac_with_public_key(self, claims: dict[str, Any], kid: str) -> str:
        """The algorithm-confusion attack: HS256 keyed with the RSA key's public PEM."""
        pem = self.keys[kid].as_pem(private=False)
        header = b64url(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
        signing_input = f"{header}.{b64url(json.dumps(claims).encode())}"
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"
