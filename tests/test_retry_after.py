"""Retry-After on a rate-limited (429) or unavailable (503) token endpoint (RFC 9110 section
10.2.3, RFC 6585 section 4).

A refresh refused with ``Retry-After: 30`` must not be tried again after the ordinary 1 s, 2 s,
4 s ... backoff: a herd of brokers doing that keeps the limit tripped. The credential's next
attempt waits at least what the server asked, capped at an hour (a hostile server cannot park a
credential for years); an unparsable or negative value is ignored, and so is anything in the
body. The gRPC answer of each refusal stays what the README's error table says.
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.lifecycle import RETRY_AFTER_CAP_SECONDS
from broker.oauth.rfc9110 import retry_after_seconds
from tests.authserver import GRANT_REFRESH_TOKEN
from tests.conftest import UPSTREAM, Broker, error_info


def _rate_limited(retry_after: str | None, body: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    payload = body if body is not None else {"error": "rate_limited"}
    return {"status": 429, "body": json.dumps(payload).encode(), "headers": headers}


def _row(broker: Broker, user: str = "alice") -> dict[str, Any]:
    return broker.rows("SELECT * FROM credentials WHERE user_id = ?", (user,))[0]


def _wait(broker: Broker) -> float:
    """How long the credential waits before its next refresh attempt, from now."""
    return float(_row(broker)["next_attempt_at"]) - broker.clock.now()


async def _refresh(broker: Broker) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    return info.value


async def test_a_429_with_delta_seconds_waits_at_least_that_long(broker: Broker) -> None:
    await broker.connect("alice")
    broker.auth.fail_next("custom", **_rate_limited("30"))
    error = await _refresh(broker)
    # The answer is unchanged: a refusal, HTTP 429.
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert (info.reason, info.metadata["http_status"]) == ("TOKEN_REQUEST_REJECTED", "429")
    assert "30" not in error.details()
    row = _row(broker)
    assert (row["status"], row["last_error"], row["failure_count"]) == ("error", "http_429", 1)
    assert 30 <= _wait(broker) <= 30 * 1.1 + 1


async def test_resolve_does_not_refresh_before_retry_after_has_passed(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(3600 + 10)  # the access token has expired
    broker.auth.fail_next("custom", **_rate_limited("30"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert error_info(info.value).reason == "TOKEN_REQUEST_REJECTED"
    assert len(broker.auth.token_requests(GRANT_REFRESH_TOKEN)) == 1
    broker.clock.advance(8)  # past the ordinary first backoff (at most 1 s), well inside 30 s
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(info.value).reason == "UPSTREAM_UNAVAILABLE"
    assert len(broker.auth.token_requests(GRANT_REFRESH_TOKEN)) == 1  # nothing sent
    broker.clock.advance(30 * 1.1)
    answer = await broker.resolve("alice")
    assert answer.access_token
    assert len(broker.auth.token_requests(GRANT_REFRESH_TOKEN)) == 2


async def test_a_503_with_an_http_date_waits_until_then(broker: Broker) -> None:
    await broker.connect("alice")
    # An IMF-fixdate two minutes after the server's own Date header (which it always sends).
    broker.auth.fail_next("503", retry_after=formatdate(time.time() + 120, usegmt=True))
    error = await _refresh(broker)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(error).reason == "UPSTREAM_UNAVAILABLE"
    assert _row(broker)["last_error"] == "http_5xx"
    assert 118 <= _wait(broker) <= 120 * 1.1 + 2


async def test_a_hostile_retry_after_is_capped_at_an_hour(broker: Broker) -> None:
    await broker.connect("alice")
    broker.auth.fail_next("custom", **_rate_limited("999999999999"))
    await _refresh(broker)
    assert RETRY_AFTER_CAP_SECONDS == 3600
    assert 3600 * 0.99 <= _wait(broker) <= 3600 + 1
    # A date years ahead is capped the same way.
    broker.auth.fail_next("503", retry_after="Fri, 31 Dec 9999 23:59:59 GMT")
    await _refresh(broker)
    assert 3600 * 0.99 <= _wait(broker) <= 3600 + 1


@pytest.mark.parametrize("value", ["soon", "-5", "1.5e3", "", "30 seconds", "Mon, 99 Foo 2024 99:99:99 GMT"])
async def test_an_unparsable_or_negative_retry_after_is_ignored(broker: Broker, value: str) -> None:
    await broker.connect("alice")
    broker.auth.fail_next("custom", **_rate_limited(value))
    error = await _refresh(broker)
    assert error_info(error).reason == "TOKEN_REQUEST_REJECTED"
    assert _row(broker)["last_error"] == "http_429"
    assert _wait(broker) <= 1.0 + 0.01  # the ordinary first backoff


async def test_a_retry_after_in_the_body_is_ignored(broker: Broker) -> None:
    await broker.connect("alice")
    body = {"error": "rate_limited", "retry_after": 600, "Retry-After": "600"}
    broker.auth.fail_next("custom", **_rate_limited(None, body))
    await _refresh(broker)
    assert _wait(broker) <= 1.0 + 0.01


async def test_a_retry_after_on_a_400_is_ignored(broker: Broker) -> None:
    """Only a 429 or 503 asks the client to come back later; a 400 with a Retry-After is a
    refusal like any other."""
    await broker.connect("alice")
    broker.auth.fail_next(
        "custom",
        status=400,
        body=json.dumps({"error": "invalid_scope"}).encode(),
        headers={"Content-Type": "application/json", "Retry-After": "600"},
    )
    await _refresh(broker)
    assert _row(broker)["last_error"] == "invalid_scope"
    assert _wait(broker) <= 1.0 + 0.01


async def test_a_later_backoff_longer_than_retry_after_stands(broker: Broker) -> None:
    """Retry-After is a floor, not a replacement: after many failures the longer backoff wins."""
    await broker.connect("alice")
    broker.auth.fail_next("500", count=9)
    for _ in range(9):
        await _refresh(broker)
    broker.auth.fail_next("custom", **_rate_limited("2"))
    await _refresh(broker)
    assert _row(broker)["failure_count"] == 10
    assert _wait(broker) >= 150  # the tenth failure's backoff: half to all of the 300 s cap


@pytest.mark.parametrize(
    ("value", "date", "expected"),
    [
        ("30", None, 30.0),
        (" 30 ", None, 30.0),
        ("0", None, 0.0),
        ("007", None, 7.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:48:37 GMT", 60.0),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:07 GMT", 30.0),  # RFC 850
        ("Sun Nov  6 08:49:37 1994", "Sun, 06 Nov 1994 08:49:27 GMT", 10.0),  # asctime
    ],
)
def test_retry_after_values_are_read_as_rfc_9110_says(value: str, date: str | None, expected: float) -> None:
    assert retry_after_seconds(value, date, now=0.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "-1",
        "+5",
        "1.5",
        "0x10",
        "30s",
        "١٢",
        "Sun, 06 Nov 1994 08:49:37",
        "Sun, 31 Feb 1994 08:49:37 GMT",
        "later",
    ],
)
def test_bad_retry_after_values_are_none(value: str | None) -> None:
    assert retry_after_seconds(value, None, now=0.0) is None


def test_an_enormous_delta_saturates_at_2_to_the_31() -> None:
    # RFC 9110 section 1.2: a delta-seconds value too large to represent is taken as 2**31.
    assert retry_after_seconds("9" * 5000, None, now=0.0) == 2.0**31


def test_a_date_in_the_past_is_none() -> None:
    assert retry_after_seconds("Sun, 06 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 09:00:00 GMT", 0.0) is None
    # Without a Date header, the broker's own wall clock is the reference.
    assert retry_after_seconds("Sun, 06 Nov 1994 08:49:37 GMT", None, now=time.time()) is None
    assert retry_after_seconds(formatdate(1_000_060, usegmt=True), None, now=1_000_000) == pytest.approx(60)
