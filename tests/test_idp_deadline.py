"""The identity provider's documents are fetched within ``http.timeout_seconds`` as a whole.

An identity provider (or something in front of it) that sends its headers at once and then
drips the discovery document or the JWKS a byte at a time never trips a per-read timeout: every
read gets a byte in time. Those fetches run on the user's RPC (under the verifier's fetch lock),
so each must be cut at its deadline, whatever the drip, and answered as an outage
(IDENTITY_PROVIDER_UNAVAILABLE), never as a bad token.
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info
from tests.idp import IdentityProvider
from tests.test_identity import identity_doc

#: The per-read gap of the drip, well under the timeout: a per-read timeout never fires.
DRIP_SECONDS = 0.1
#: The document's size: dripped whole it would take 30 s, far beyond the 1 s timeout.
DOCUMENT_BYTES = 300
TIMEOUT_SECONDS = 1.0


class DripServer(ThreadingHTTPServer):
    """Answers every GET with 200, a JSON Content-Length, then one body byte per DRIP_SECONDS."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _DripHandler)
        self.stopping = threading.Event()
        self.requests = 0

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn() lookup
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """The broker hangs up mid-drip on purpose: stay quiet."""


class _DripHandler(BaseHTTPRequestHandler):
    server: DripServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """No request log."""

    def do_GET(self) -> None:
        self.server.requests += 1
        body = b'{"keys": [' + b" " * (DOCUMENT_BYTES - 12) + b"]}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        for index in range(len(body)):
            if self.server.stopping.wait(DRIP_SECONDS):
                return
            try:
                self.wfile.write(body[index : index + 1])
                self.wfile.flush()
            except OSError:
                return  # the broker hung up: what it should do


@pytest.fixture
def drip() -> Iterator[DripServer]:
    server = DripServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)


async def _call(broker: Broker, token: str) -> tuple[float, grpc.StatusCode, str]:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    return time.monotonic() - started, info.value.code(), error_info(info.value).reason


async def test_a_dripped_jwks_is_cut_at_the_timeout(
    make_broker: BrokerFactory, idp: IdentityProvider, drip: DripServer
) -> None:
    broker = await make_broker(
        identity=identity_doc(idp, jwks_uri=drip.base_url + "/jwks"),
        http={"timeout_seconds": TIMEOUT_SECONDS},
    )
    token = idp.sign(idp.claims("alice"), "rsa-1")
    took, code, reason = await _call(broker, token)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "IDENTITY_PROVIDER_UNAVAILABLE")
    assert drip.requests == 1
    assert took < TIMEOUT_SECONDS + 2.0, f"the fetch ran {took:.1f} s"


async def test_a_dripped_discovery_document_is_cut_at_the_timeout(
    make_broker: BrokerFactory, idp: IdentityProvider, drip: DripServer
) -> None:
    broker = await make_broker(
        identity=identity_doc(idp, issuer=drip.base_url), http={"timeout_seconds": TIMEOUT_SECONDS}
    )
    token = idp.sign(idp.claims("alice"), "rsa-1")
    took, code, reason = await _call(broker, token)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "IDENTITY_PROVIDER_UNAVAILABLE")
    assert drip.requests == 1
    assert took < TIMEOUT_SECONDS + 2.0, f"the fetch ran {took:.1f} s"
    # The cut fetch is an outage like any other: retried after 1 s, not at once.
    took, code, reason = await _call(broker, token)
    assert reason == "IDENTITY_PROVIDER_UNAVAILABLE" and drip.requests == 1 and took < 1.0


async def test_a_slow_but_whole_document_within_the_timeout_still_works(
    make_broker: BrokerFactory, idp: IdentityProvider
) -> None:
    """The deadline is the whole fetch's, not a tighter one: the normal IdP works as before."""
    broker = await make_broker(identity=identity_doc(idp), http={"timeout_seconds": TIMEOUT_SECONDS})
    token = idp.sign(idp.claims("alice"), "rsa-1")
    answer = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    assert answer.authorization_url
