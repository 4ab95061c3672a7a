"""BrokerAuth (httpx, sync and async) and BrokerRequestsAuth (requests): the broker's header on
every upstream request; on a 401, one resolve with ``rejected_access_token`` (the broker
refreshes) and one retry with the new token; never more than one retry."""

from __future__ import annotations

import asyncio

import httpx
import requests
from credential_broker_client import AsyncBrokerClient, BrokerAuth, BrokerClient, BrokerRequestsAuth

from tests.conftest import UPSTREAM, Broker

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
