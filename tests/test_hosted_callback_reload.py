"""Hosted connect: the user reloads the callback page while the broker is still completing.

A slow token endpoint keeps the browser on the callback URL; a user who presses reload (or a
browser that retries the navigation) sends the same callback again, with the same cookie. The
first request has already taken the flow, so the second used to find nothing and send the user
to the application with ``status=failed&reason=flow_not_found`` while the first went on to
store the credential: the app told a connected user that connecting failed.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, BrokerFactory
from tests.hosted import LandingPage, hosted_broker, landing_page
from tests.test_hosted_connect import Browserish, _authorized, _count, _landing


@pytest.fixture
def landing() -> Any:
    yield from landing_page()


async def _token_request_sent(auth_server: AuthServer) -> None:
    for _ in range(500):
        if auth_server.token_requests():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the broker never called the token endpoint")


async def test_reload_while_the_token_request_is_slow_lands_connected(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    first, reload, stranger = Browserish(broker), Browserish(broker), Browserish(broker)
    try:
        location = (await first.start(started.authorization_url)).headers["location"]
        callback = await _authorized(broker, location)
        auth_server.fail_next("timeout", seconds=1.5)  # the token endpoint answers late
        waiting = asyncio.create_task(first.callback(callback))
        await _token_request_sent(auth_server)
        # Another browser meanwhile (a wrong cookie) gets nothing of the outcome.
        stranger.cookie = secrets.token_urlsafe(32)
        refused = await stranger.callback(callback)
        assert "connected" not in refused.headers.get("location", "")
        # The reload: the same browser, its cookie as it was (the first answer has not come).
        reload.cookie = first.cookie
        again = _landing(await reload.callback(callback), landing)
        assert again == {"upstream": UPSTREAM, "status": "connected"}
        assert reload.cookie is None  # the flow's secret is dropped by this answer too
        assert _landing(await waiting, landing) == {"upstream": UPSTREAM, "status": "connected"}
    finally:
        for browser in (first, reload, stranger):
            await browser.aclose()
    assert len(auth_server.token_requests()) == 1  # the code was presented once
    assert _count(broker, "credentials") == 1


async def test_reload_of_a_failing_callback_gets_the_same_failure(
    make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage
) -> None:
    broker = await hosted_broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    first, reload = Browserish(broker), Browserish(broker)
    try:
        location = (await first.start(started.authorization_url)).headers["location"]
        callback = await _authorized(broker, location)
        auth_server.fail_next("oauth_error", delay=1.0, error="invalid_grant")
        waiting = asyncio.create_task(first.callback(callback))
        await _token_request_sent(auth_server)
        reload.cookie = first.cookie
        again = _landing(await reload.callback(callback), landing)
        done = _landing(await waiting, landing)
        assert again == done and done["status"] == "failed" and done["reason"] != "flow_not_found"
    finally:
        await first.aclose()
        await reload.aclose()
    assert _count(broker, "credentials") == 0
