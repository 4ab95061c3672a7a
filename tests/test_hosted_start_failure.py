"""Hosted connect: /start when the authorization server cannot be reached (a pushed
authorization request, RFC 9126, that fails).

Opening the link binds the flow to the browser before the request is pushed, so the link is
used up whatever the push does. The page used to say "Try again in a moment", and the retry
(a reload) then met "Link no longer valid": the page must send the user back to the app.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.authserver import AuthServer
from tests.conftest import BrokerFactory, upstream_doc
from tests.hosted import LandingPage, free_port, landing_page
from tests.test_par import ParServer


@pytest.fixture
def landing() -> Iterator[LandingPage]:
    yield from landing_page()


@pytest.fixture
def par(auth_server: AuthServer) -> Iterator[ParServer]:
    server = ParServer(auth_server)
    try:
        yield server
    finally:
        server.stop()


async def test_failed_push_at_start_sends_the_user_back_to_the_app(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage, par: ParServer
) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    client = auth_server.new_client(redirect_uri=public + "/callback")
    upstream = upstream_doc(
        auth_server,
        client,
        redirect_uri=public + "/callback",
        pushed_authorization_requests=True,
        pushed_authorization_request_endpoint=par.endpoint,
    )
    broker = await make_broker(
        client=client,
        upstreams=[upstream],
        connect={"listen": f"127.0.0.1:{port}", "public_url": public, "return_to": landing.url},
    )
    started = await broker.start_flow("alice")
    par.behaviour = "500"
    async with httpx.AsyncClient(follow_redirects=False, timeout=10) as http:
        failed = await http.get(started.authorization_url)
        assert failed.status_code == 502
        assert "Go back to the application and connect again" in failed.text
        assert "Try again in a moment" not in failed.text  # a retry of this link cannot work
        par.behaviour = "ok"
        again = await http.get(started.authorization_url)
        assert again.status_code == 410  # what that retry meets
