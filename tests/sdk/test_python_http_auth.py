"""BrokerAuth (httpx, sync and async) and BrokerRequestsAuth (requests): the broker's header on
every upstream request; on a 401, one resolve with ``rejected_access_token`` (the broker
refreshes) and one retry with the new token; never more than one retry. The retry resends the
whole body (or, for requests with a body it cannot replay, is not made); a 401 from another
origin reached by a redirect is no rejection of our token; our header never follows a redirect
to another origin."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator

import httpx
import requests
from credential_broker_client import AsyncBrokerClient, BrokerAuth, BrokerClient, BrokerRequestsAuth

from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, upstream_doc

from .conftest import connect, target
from .upstream_api import UpstreamAPI


def _refreshes(broker: Broker) -> int:
    return len(broker.auth.token_requests("refresh_token"))


def _check_retried_with_a_new_token(api: UpstreamAPI, broker: Broker, before: int) -> None:
    assert len(api.seen) == 2, api.seen and "want exactly one retry"
    first, second = api.seen
    assert first.startswith("Bearer ") and second.startswith("Bearer ")
    assert first != second, "the retry must carry the refreshed token"
    assert second.removeprefix("Bearer ") in broker.auth.issued
    assert _refreshes(broker) == before + 1, "the broker refreshes once for the rejected token"
    assert api.bodies[0] == api.bodies[1]


async def test_httpx_sync_auth_retries_one_401_with_a_refreshed_token(broker: Broker) -> None:
    with BrokerClient(target(broker), cache=True) as client, UpstreamAPI() as api:
        await asyncio.to_thread(connect, client, broker.auth, "alice")
        broker.clock.advance(31)  # past min_refresh_interval_seconds since the connect
        before = _refreshes(broker)

        def call() -> httpx.Response:
            with httpx.Client(auth=BrokerAuth(client, "alice", UPSTREAM)) as http:
                return http.post(api.url, content=b"payload")

        response = await asyncio.to_thread(call)
        assert response.status_code == 200
        _check_retried_with_a_new_token(api, broker, before)


async def test_httpx_async_auth_retries_one_401_with_a_refreshed_token(broker: Broker) -> None:
    async with AsyncBrokerClient(target(broker)) as client:
        with BrokerClient(target(broker)) as sync_client:
            await asyncio.to_thread(connect, sync_client, broker.auth, "bob")
        broker.clock.advance(31)  # past min_refresh_interval_seconds since the connect
        before = _refreshes(broker)
        with UpstreamAPI() as api:
            async with httpx.AsyncClient(auth=BrokerAuth(client, "bob", UPSTREAM)) as http:
                response = await http.post(api.url, content=b"payload")
            assert response.status_code == 200
            _check_retried_with_a_new_token(api, broker, before)


async def test_requests_auth_retries_one_401_with_a_refreshed_token(broker: Broker) -> None:
    with BrokerClient(target(broker)) as client, UpstreamAPI() as api:
        await asyncio.to_thread(connect, client, broker.auth, "carol")
        broker.clock.advance(31)  # past min_refresh_interval_seconds since the connect
        before = _refreshes(broker)

        def call() -> requests.Response:
            with requests.Session() as session:
                return session.post(
                    api.url, data=b"payload", auth=BrokerRequestsAuth(client, "carol", UPSTREAM)
                )

        response = await asyncio.to_thread(call)
        assert response.status_code == 200
        assert len(response.history) == 1 and response.history[0].status_code == 401
        _check_retried_with_a_new_token(api, broker, before)


async def test_a_second_401_is_returned_not_retried(broker: Broker) -> None:
    """An upstream that refuses every token gets exactly two requests from each integration."""
    with BrokerClient(target(broker)) as client:
        await asyncio.to_thread(connect, client, broker.auth, "dan")
        with UpstreamAPI(refuse_all=True) as api:

            def via_httpx() -> int:
                with httpx.Client(auth=BrokerAuth(client, "dan", UPSTREAM)) as http:
                    return http.get(api.url).status_code

            assert await asyncio.to_thread(via_httpx) == 401
            assert len(api.seen) == 2

            def via_requests() -> int:
                return requests.get(
                    api.url, auth=BrokerRequestsAuth(client, "dan", UPSTREAM), timeout=10
                ).status_code

            assert await asyncio.to_thread(via_requests) == 401
            assert len(api.seen) == 4
        async with AsyncBrokerClient(target(broker)) as aclient:
            with UpstreamAPI(refuse_all=True) as api2:
                async with httpx.AsyncClient(auth=BrokerAuth(aclient, "dan", UPSTREAM)) as http:
                    assert (await http.get(api2.url)).status_code == 401
                assert len(api2.seen) == 2


BODY = [b"first chunk,", b"second chunk"]


def _chunks() -> Iterator[bytes]:
    yield from BODY


async def _achunks() -> AsyncIterator[bytes]:
    for chunk in BODY:
        yield chunk


async def test_httpx_retry_resends_a_streamed_body(broker: Broker) -> None:
    """httpx reads a generator body before the first send, so the retry carries all of it."""
    with BrokerClient(target(broker)) as client:
        await asyncio.to_thread(connect, client, broker.auth, "erin")
        broker.clock.advance(31)  # past min_refresh_interval_seconds since the connect

        def call(url: str) -> httpx.Response:
            with httpx.Client(auth=BrokerAuth(client, "erin", UPSTREAM)) as http:
                return http.post(url, content=_chunks())

        with UpstreamAPI() as api:
            assert (await asyncio.to_thread(call, api.url)).status_code == 200
            assert api.bodies == [b"".join(BODY)] * 2
        broker.clock.advance(31)
        async with AsyncBrokerClient(target(broker)) as aclient:
            with UpstreamAPI() as api:
                async with httpx.AsyncClient(auth=BrokerAuth(aclient, "erin", UPSTREAM)) as http:
                    assert (await http.post(api.url, content=_achunks())).status_code == 200
                assert api.bodies == [b"".join(BODY)] * 2


async def test_requests_retries_only_a_body_it_can_replay(broker: Broker) -> None:
    """A file body is rewound and resent; a generator body cannot be, so its 401 is returned
    (after the resolve that makes the next request carry a fresh token), never resent empty."""
    with BrokerClient(target(broker)) as client:
        await asyncio.to_thread(connect, client, broker.auth, "fay")
        auth = BrokerRequestsAuth(client, "fay", UPSTREAM)
        broker.clock.advance(31)  # past min_refresh_interval_seconds since the connect
        with UpstreamAPI() as api:
            file = io.BytesIO(b"skipped:" + b"".join(BODY))
            file.seek(len(b"skipped:"))
            response = await asyncio.to_thread(requests.post, api.url, data=file, auth=auth, timeout=10)
            assert response.status_code == 200
            assert api.bodies == [b"".join(BODY)] * 2
        broker.clock.advance(31)
        before = _refreshes(broker)
        with UpstreamAPI() as api:
            response = await asyncio.to_thread(requests.post, api.url, data=_chunks(), auth=auth, timeout=10)
            assert response.status_code == 401 and api.bodies == [b"".join(BODY)]
            assert _refreshes(broker) == before + 1
            again = await asyncio.to_thread(requests.post, api.url, data=_chunks(), auth=auth, timeout=10)
            assert again.status_code == 200 and api.bodies[1] == b"".join(BODY)
            assert api.seen[0] != api.seen[1]


async def test_a_401_from_another_origin_after_a_redirect_is_no_rejection(broker: Broker) -> None:
    """Our origin redirects to another that answers 401: the 401 is returned as is, without a
    resolve for a token that origin never saw and without sending it one."""
    with BrokerClient(target(broker)) as client:
        await asyncio.to_thread(connect, client, broker.auth, "gus")
        broker.clock.advance(31)  # a refresh would be allowed: none must happen
        before = _refreshes(broker)
        with UpstreamAPI(refuse_all=True) as other, UpstreamAPI(redirect_to=other.url) as ours:

            def via_requests() -> int:
                auth = BrokerRequestsAuth(client, "gus", UPSTREAM)
                return requests.get(ours.url, auth=auth, timeout=10).status_code

            def via_httpx() -> int:
                auth = BrokerAuth(client, "gus", UPSTREAM)
                with httpx.Client(auth=auth, follow_redirects=True) as http:
                    return http.get(ours.url).status_code

            assert await asyncio.to_thread(via_requests) == 401
            assert await asyncio.to_thread(via_httpx) == 401
            async with AsyncBrokerClient(target(broker)) as aclient:
                auth = BrokerAuth(aclient, "gus", UPSTREAM)
                async with httpx.AsyncClient(auth=auth, follow_redirects=True) as http:
                    assert (await http.get(ours.url)).status_code == 401
            assert len(ours.seen) == 3 and all(ours.seen)
            assert other.seen == ["", "", ""]
        assert _refreshes(broker) == before


async def test_a_custom_credential_header_does_not_follow_a_redirect_to_another_origin(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    """requests and httpx strip only Authorization on a cross-origin redirect; an upstream's
    other header (an API key) must not reach the other origin either."""
    oauth_client = auth_server.new_client()
    doc = upstream_doc(auth_server, oauth_client, header="X-Api-Key", header_format="{token}")
    broker = await make_broker(client=oauth_client, upstreams=[doc])
    with BrokerClient(target(broker)) as client:
        await asyncio.to_thread(connect, client, broker.auth, "hal")
        with UpstreamAPI() as other, UpstreamAPI(redirect_to=other.url, redirect_status=302) as ours:

            def via_requests() -> None:
                requests.get(ours.url, auth=BrokerRequestsAuth(client, "hal", UPSTREAM), timeout=10)

            def via_httpx() -> None:  # followed by hand: next_request is what httpx built
                with httpx.Client() as http:
                    redirect = http.get(ours.url, auth=BrokerAuth(client, "hal", UPSTREAM))
                    assert redirect.next_request is not None
                    http.send(redirect.next_request)

            await asyncio.to_thread(via_requests)
            await asyncio.to_thread(via_httpx)
            assert [h.get("x-api-key", "") in broker.auth.issued for h in ours.headers] == [True, True]
            assert len(other.headers) == 2
            assert not any("x-api-key" in h for h in other.headers), other.headers
