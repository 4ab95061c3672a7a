"""A loopback upstream API for the SDKs' 401 path: it answers 401 to the first token it sees
(or to every token, with ``refuse_all``) and 200 to any other, recording what it was sent.
With ``redirect_to`` it answers every request with a redirect there instead (another server
on another port is another origin)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class UpstreamAPI:
    """Start with ``with UpstreamAPI() as api:``; ``api.url`` is its base URL."""

    def __init__(
        self, *, refuse_all: bool = False, redirect_to: str | None = None, redirect_status: int = 307
    ) -> None:
        self.refuse_all = refuse_all
        self.redirect_to = redirect_to
        self.redirect_status = redirect_status
        self.seen: list[str] = []  # the Authorization header of every request, in order
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []  # every request's headers, names in lower case
        self._refused: str | None = None
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}
                status = api._decide(headers, self._body(headers))
                payload = b'{"ok": true}' if status == 200 else b'{"error": "invalid_token"}'
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
                if api.redirect_to is not None:
                    self.send_header("Location", api.redirect_to)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self, headers: dict[str, str]) -> bytes:
                if headers.get("transfer-encoding", "").lower() != "chunked":
                    length = int(headers.get("content-length") or 0)
                    return self.rfile.read(length) if length else b""
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()  # the blank line after the last chunk (no trailers sent)
                return body

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _decide(self, headers: dict[str, str], body: bytes) -> int:
        authorization = headers.get("authorization", "")
        with self._lock:
            self.seen.append(authorization)
            self.bodies.append(body)
            self.headers.append(headers)
            if self.redirect_to is not None:
                return self.redirect_status
            if self.refuse_all or not authorization:
                return 401
            if self._refused is None:
                self._refused = authorization
            return 401 if authorization == self._refused else 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/me"

    def __enter__(self) -> UpstreamAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
