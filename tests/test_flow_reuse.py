"""Resolve never destroys a login in progress (issue 12, item 6).

A NOT_CONNECTED / RECONNECT_REQUIRED answer carries an authorization URL. It reuses the newest
live flow of (user, upstream) while that flow has at least half its lifetime left, so an app that
polls Resolve does not start (and, past ``max_pending_flows``, evict) flows. Only an explicit
BuildAuthorizationURL always starts one.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import Broker, BrokerFactory, error_info


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


def _flows(broker: Broker) -> int:
    return int(broker.query("SELECT COUNT(*) FROM pending_flows")[0][0])


def _state(url: str) -> str:
    return parse_qs(urlsplit(url).query)["state"][0]


async def _connect_url(broker: Broker, user: str = "alice") -> tuple[str, str]:
    """(reason, authorization_url) of a Resolve that must answer "connect first"."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve(user)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = error_info(info.value)
    return detail.reason, detail.metadata["authorization_url"]


async def test_fifty_resolves_keep_the_first_flow_completable(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    started = await broker.start_flow("alice")
    assert _flows(broker) == 1
    urls = []
    for batch in range(5):  # sequential and concurrent polls alike
        if batch % 2:
            urls += await asyncio.gather(*(_connect_url(broker) for _ in range(10)))
        else:
            urls += [await _connect_url(broker) for _ in range(10)]
    assert len(urls) == 50
    assert {reason for reason, _ in urls} == {"NOT_CONNECTED"}
    flows = _flows(broker)
    # The state is sealed, never stored in the clear.
    assert started.state.encode() not in broker.db_bytes()
    # The user finishes the login they started first: it still works.
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    done = await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
    )
    assert done.credential.user_id == "alice"
    assert (await broker.resolve("alice")).access_token
    # The 50 Resolves created at most one flow (here none: the first one had its whole life left),
    # and every answer sent the user to the flow already started: same state, same PKCE challenge.
    assert flows - 1 <= 1
    assert flows == 1 and {url for _, url in urls} == {started.authorization_url}


async def test_polling_without_a_flow_starts_one_and_reuses_it(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    urls = await asyncio.gather(*(_connect_url(broker, "bob") for _ in range(20)))
    urls += [await _connect_url(broker, "bob") for _ in range(20)]
    assert len({url for _, url in urls}) == 1 and _flows(broker) == 1
    url = urls[0][1]
    callback = await asyncio.to_thread(broker.auth.authorize, url, "bob")
    await broker.stub.Complete(pb.CompleteRequest(state=_state(url), code=callback["code"], user_id="bob"))
    assert (await broker.resolve("bob")).access_token


async def test_a_flow_past_half_its_life_is_replaced_once(make_broker: BrokerFactory) -> None:
    broker = await make_broker(flow_ttl_seconds=600)
    first = await broker.start_flow("alice")
    broker.clock.advance(299)  # 301 s of 600 left: still reusable
    assert (await _connect_url(broker))[1] == first.authorization_url
    broker.clock.advance(2)  # 299 s left: less than half
    _, second = await _connect_url(broker)
    assert second != first.authorization_url and _flows(broker) == 2
    for _ in range(10):
        assert (await _connect_url(broker))[1] == second
    assert _flows(broker) == 2
    # The old flow is still live (not evicted) and completes.
    callback = await asyncio.to_thread(broker.auth.authorize, first.authorization_url, "alice")
    await broker.stub.Complete(pb.CompleteRequest(state=first.state, code=callback["code"], user_id="alice"))


async def test_build_authorization_url_always_starts_a_new_flow(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    first = await broker.start_flow("alice")
    second = await broker.start_flow("alice")
    assert first.state != second.state and _flows(broker) == 2
    # Resolve now points at the newest flow.
    assert (await _connect_url(broker))[1] == second.authorization_url
    assert _flows(broker) == 2


async def test_flows_are_per_user(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    alice = await broker.start_flow("alice")
    _, bob_url = await _connect_url(broker, "bob")
    assert _state(bob_url) != alice.state and _flows(broker) == 2
    # Bob's URL is Bob's flow: Alice cannot complete it.
    callback = await asyncio.to_thread(broker.auth.authorize, bob_url, "bob")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=_state(bob_url), code=callback["code"], user_id="alice")
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_reconnect_required_reuses_the_flow_too(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    await broker.connect("alice")
    broker.auth.revoke_user("alice")
    broker.clock.advance(3600)  # the access token has expired; the refresh is refused
    reason, url = await _connect_url(broker)
    assert reason == "RECONNECT_REQUIRED"
    for _ in range(10):
        assert await _connect_url(broker) == ("RECONNECT_REQUIRED", url)
    assert _flows(broker) == 1
    callback = await asyncio.to_thread(broker.auth.authorize, url, "alice")
    await broker.stub.Complete(pb.CompleteRequest(state=_state(url), code=callback["code"], user_id="alice"))
    assert (await broker.resolve("alice")).access_token
