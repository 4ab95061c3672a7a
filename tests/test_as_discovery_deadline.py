"""RFC 8414 discovery at start-up is bounded by ``http.timeout_seconds`` as a whole.

A metadata server that sends its headers at once and then one byte of the document every few
hundred milliseconds never lets a single read time out. Without a deadline on the whole fetch,
``serve`` (and ``build_app``) sat in start-up for as long as the server kept dripping (26 s for
an 86-byte document at a 1 s timeout; days for a 256 KiB one) instead of failing with one line.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import load_config
from broker.errors import ConfigError
from broker.oauth.rfc8414 import MetadataCache, apply_discovery
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, upstream_doc

TIMEOUT = 1.0
DRIP = 0.3  # seconds between bytes: far below the timeout, so no single read times out
MARGIN = 2.0  # a loaded machine


class DrippingMetadataServer:
    """Answers every GET on loopback with a valid metadata document, one byte every DRIP s."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.issuer = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        body = json.dumps({"issuer": self.issuer, "token_endpoint": self.issuer + "/token"}).encode()
        with connection:
            connection.recv(65536)
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            try:
                connection.sendall(head.encode())
                for index in range(len(body)):
                    if self._stop.wait(DRIP):
                        return
                    connection.sendall(body[index : index + 1])
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.fixture
def dripping() -> Iterator[DrippingMetadataServer]:
    server = DrippingMetadataServer()
    yield server
    server.stop()


def test_a_dripping_metadata_document_is_cut_at_the_deadline(dripping: DrippingMetadataServer) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="timed out") as info:
        MetadataCache(timeout=TIMEOUT).get(dripping.issuer)
    took = time.monotonic() - started
    # Both metadata URLs are tried, each within its own deadline (plus at most one read).
    assert took <= 2 * (2 * TIMEOUT) + MARGIN, took
    assert dripping.issuer in str(info.value)  # names the URL, as other discovery problems do


def test_start_up_fails_in_time_against_a_dripping_issuer(
    dripping: DrippingMetadataServer, auth_server: AuthServer, tmp_path: Path
) -> None:
    client = auth_server.new_client(auth_method="client_secret_basic", redirect_uri=REDIRECT_URI)
    doc = upstream_doc(auth_server, client, issuer=dripping.issuer)
    del doc["auth_broker"]["token_endpoint"]
    config = load_config(
        {
            "keyring": {"file": str(tmp_path / "k.json")},
            "upstreams": [doc],
            "http": {"timeout_seconds": TIMEOUT},
        },
        environ={},
        base_dir=tmp_path,
    )
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"upstreams\[0\].auth_broker.issuer: metadata could not be used"):
        apply_discovery(config, MetadataCache(timeout=TIMEOUT))
    assert time.monotonic() - started <= 2 * (2 * TIMEOUT) + MARGIN
