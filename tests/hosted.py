"""Helpers for the hosted connect tests: a broker with its connect listener, and the app's page.

The ``return_to`` of these brokers is :class:`LandingPage`, a real loopback HTTP server that
plays the application the user comes back to: it shows the ``upstream``, ``status`` and
``reason`` the broker sent (so a browser screenshot shows the outcome) and records every visit.
"""

from __future__ import annotations

import html
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.authserver import AuthServer
from tests.conftest import Broker, BrokerFactory, upstream_doc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LandingPage:
    """The application's return page on 127.0.0.1: ``/done`` shows the query it was given."""

    def __init__(self) -> None:
        self.visits: list[dict[str, str]] = []
        page = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                page.visits.append(query)
                rows = "".join(
                    f"<li id='{html.escape(k)}'>{html.escape(k)}: {html.escape(v)}</li>"
                    for k, v in sorted(query.items())
                )
                body = (
                    "<!doctype html><html><head><title>Example app</title></head><body>"
                    f"<h1>Back in the example app</h1><ul>{rows}</ul></body></html>"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/done"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def landing_page() -> Iterator[LandingPage]:
    page = LandingPage()
    try:
        yield page
    finally:
        page.stop()


async def hosted_broker(
    make_broker: BrokerFactory,
    auth_server: AuthServer,
    landing: LandingPage,
    *,
    public_url: str | None = None,
    path: str = "",
    **settings: Any,
) -> Broker:
    """A broker whose connect listener serves on a free loopback port, ``public_url`` being
    ``http://127.0.0.1:PORT{path}`` unless given; the upstream's redirect URI is its callback."""
    port = free_port()
    public = public_url or f"http://127.0.0.1:{port}{path}"
    callback = public + "/callback"
    client = auth_server.new_client(redirect_uri=callback)
    connect = {"listen": f"127.0.0.1:{port}", "public_url": public, "return_to": landing.url}
    connect.update(settings.pop("connect", {}))
    broker = await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client, redirect_uri=callback)],
        connect=connect,
        **settings,
    )
    broker.extra["connect_base"] = f"http://127.0.0.1:{port}{path}"
    broker.extra["public_url"] = public
    return broker
