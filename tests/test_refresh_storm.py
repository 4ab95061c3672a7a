"""Asking for more than a token can give does not cause a refresh storm.

A caller asks ``min_valid_seconds=86400`` of a provider whose tokens live 3600 s. One refresh
cannot meet that floor, and neither can the next: the broker refreshes once, hands out the
fresh token with its true ``expires_at``, and does not refresh that credential again within
``min_refresh_interval_seconds`` (default 30).
"""

from __future__ import annotations

import asyncio

import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker, BrokerFactory

DAY = 86400


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both store backends."""
    return str(request.param)


def _grants(broker: Broker) -> int:
    return len(broker.auth.token_requests("refresh_token"))


async def test_100_resolves_asking_a_day_of_a_one_hour_token_make_one_grant(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(600)  # the credential is 10 minutes old: 50 minutes left
    together = await asyncio.gather(*(broker.resolve("alice", min_valid_seconds=DAY) for _ in range(50)))
    one_by_one = [await broker.resolve("alice", min_valid_seconds=DAY) for _ in range(50)]
    assert _grants(broker) == 1
    answers = together + one_by_one
    assert len({a.access_token for a in answers}) == 1
    (token,) = {a.access_token for a in answers}
    assert broker.auth.access_token_info(token)["grant_type"] == "refresh_token"  # the fresh one
    # Its true expiry: an hour from the refresh, not the day the caller asked for.
    now = broker.clock.now()
    assert {a.expires_at.seconds for a in answers} == {int(now + 3600)}


async def test_the_next_refresh_waits_for_the_minimum_interval(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(600)
    first = await broker.resolve("alice", min_valid_seconds=DAY)
    assert _grants(broker) == 1
    broker.clock.advance(29)
    same = await broker.resolve("alice", min_valid_seconds=DAY)
    assert same.access_token == first.access_token and _grants(broker) == 1
    broker.clock.advance(2)  # 31 s after the refresh: one more is allowed, and only one
    answers = [await broker.resolve("alice", min_valid_seconds=DAY) for _ in range(20)]
    assert _grants(broker) == 2
    assert len({a.access_token for a in answers}) == 1 and answers[0].access_token != first.access_token


async def test_a_just_connected_credential_is_not_refreshed_for_an_unmeetable_floor(broker: Broker) -> None:
    done = await broker.connect("alice")
    answer = await broker.resolve("alice", min_valid_seconds=DAY)
    assert _grants(broker) == 0  # obtained seconds ago: a refresh would give no more
    assert answer.expires_at.seconds == done.credential.expires_at.seconds


async def test_a_floor_a_refresh_can_meet_waits_for_the_interval_then_refreshes(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(10)  # inside the minimum interval ...
    first = await broker.resolve("alice", min_valid_seconds=3595)  # ... but 3590 s left < 3595
    assert _grants(broker) == 0  # the token was obtained 10 s ago: it cannot get better
    broker.clock.advance(25)
    renewed = await broker.resolve("alice", min_valid_seconds=3595)
    assert _grants(broker) == 1 and renewed.access_token != first.access_token
    assert renewed.expires_at.seconds - int(broker.clock.now()) >= 3595


async def test_the_refresh_window_is_never_held_back(broker: Broker) -> None:
    """A token that is about to expire is refreshed, however recently it was obtained."""
    broker.auth.access_ttl = 30  # shorter than the 60 s refresh window
    await broker.connect("alice")
    broker.auth.access_ttl = 3600
    renewed = await broker.resolve("alice", min_valid_seconds=DAY)
    assert _grants(broker) == 1
    assert renewed.expires_at.seconds == int(broker.clock.now() + 3600)


async def test_an_explicit_refresh_is_always_made(broker: Broker) -> None:
    await broker.connect("alice")
    for _ in range(3):
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert _grants(broker) == 3


async def test_the_minimum_interval_is_configurable(make_broker: BrokerFactory) -> None:
    broker = await make_broker(min_refresh_interval_seconds=0)
    await broker.connect("alice")
    for _ in range(3):
        await broker.resolve("alice", min_valid_seconds=DAY)
    assert _grants(broker) == 3  # the operator chose no minimum interval
