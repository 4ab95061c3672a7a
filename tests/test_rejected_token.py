"""ResolveRequest.rejected_access_token (issue 13): "the upstream refused this token (401)".

When it equals the stored access token the broker refreshes once before answering: one refresh
for any number of concurrent callers, and never more often than min_refresh_interval_seconds.
Any other value changes nothing, and no value is ever logged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import grpc
import pytest

from tests import leakcheck
from tests.conftest import Broker, BrokerFactory, error_info


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _refreshes(broker: Broker) -> int:
    return len(broker.auth.token_requests("refresh_token"))


async def _connected(make_broker: BrokerFactory) -> tuple[Broker, str]:
    broker = await make_broker()
    await broker.connect("alice")
    token = (await broker.resolve("alice")).access_token
    broker.clock.advance(31)  # past min_refresh_interval_seconds (30) since the connect
    return broker, token


async def test_the_stored_token_rejected_is_refreshed_once(make_broker: BrokerFactory) -> None:
    broker, token = await _connected(make_broker)
    renewed = await broker.resolve("alice", rejected_access_token=token)
    assert renewed.access_token != token
    assert broker.auth.access_token_info(renewed.access_token)["user"] == "alice"
    assert _refreshes(broker) == 1
    # The app retries with the new token and is fine: nothing more happens.
    assert (await broker.resolve("alice")).access_token == renewed.access_token
    # A caller still holding the old token reports it rejected: already replaced, no refresh.
    assert (await broker.resolve("alice", rejected_access_token=token)).access_token == renewed.access_token
    assert _refreshes(broker) == 1


async def test_twenty_concurrent_callers_with_the_same_rejected_token_make_one_refresh(
    make_broker: BrokerFactory,
) -> None:
    broker, token = await _connected(make_broker)
    broker.auth.fail_next("timeout", seconds=0.3)  # a slow refresh: every caller piles up
    answers = await asyncio.gather(*(broker.resolve("alice", rejected_access_token=token) for _ in range(20)))
    assert len({a.access_token for a in answers}) == 1
    assert answers[0].access_token != token
    assert _refreshes(broker) == 1


async def test_a_different_or_unknown_value_changes_nothing_and_is_never_logged(
    make_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="credential_broker")
    broker, token = await _connected(make_broker)
    other = "at_" + secrets.token_urlsafe(24)
    leakcheck.add_secret(other)
    for value in (other, token[:-1], token + "x", token.upper(), " " + token, "x" * 70_000):
        assert (await broker.resolve("alice", rejected_access_token=value)).access_token == token
    assert _refreshes(broker) == 0
    # Another user's token rejected for alice changes nothing either.
    await broker.connect("bob")
    bobs = (await broker.resolve("bob")).access_token
    assert (await broker.resolve("alice", rejected_access_token=bobs)).access_token == token
    assert (await broker.resolve("bob")).access_token == bobs
    assert _refreshes(broker) == 0
    assert other not in caplog.text and token not in caplog.text


async def test_no_more_often_than_min_refresh_interval(make_broker: BrokerFactory) -> None:
    broker = await make_broker(min_refresh_interval_seconds=120)
    await broker.connect("alice")
    token = (await broker.resolve("alice")).access_token
    broker.clock.advance(60)  # connected 60 s ago: too recent
    assert (await broker.resolve("alice", rejected_access_token=token)).access_token == token
    assert _refreshes(broker) == 0
    broker.clock.advance(61)
    first = (await broker.resolve("alice", rejected_access_token=token)).access_token
    assert first != token and _refreshes(broker) == 1
    broker.clock.advance(10)  # the new one is refused at once too: not again so soon
    assert (await broker.resolve("alice", rejected_access_token=first)).access_token == first
    assert _refreshes(broker) == 1


async def test_a_rejected_token_whose_grant_is_dead_asks_to_reconnect(make_broker: BrokerFactory) -> None:
    broker, token = await _connected(make_broker)
    broker.auth.revoke_user("alice")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice", rejected_access_token=token)
    assert error_info(info.value).reason == "RECONNECT_REQUIRED"
    assert _refreshes(broker) == 1
