"""Numbers in token answers that Python's float cannot hold.

JSON numbers have no size limit. An integer ``expires_in`` with hundreds of digits is legal JSON
that ``json.loads`` turns into a Python int; it must be the invalid-answer error
(UPSTREAM_UNAVAILABLE, nothing stored, backoff recorded), never an unexpected exception that
surfaces as INTERNAL and leaves the credential without a recorded failure.
"""

from __future__ import annotations

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.config import TokenResponsePaths
from broker.errors import UpstreamUnavailable
from broker.oauth.rfc6749 import parse_token_response
from broker.providers.shaping import parse_answer
from tests.conftest import UPSTREAM, Broker, error_info

HUGE = 10**400  # an int: float(HUGE) raises OverflowError


@pytest.mark.parametrize("number", [str(HUGE), str(-HUGE)], ids=["huge", "huge negative"])
def test_an_expires_in_beyond_float_is_the_invalid_answer_error(number: str) -> None:
    body = b'{"access_token": "at", "expires_in": ' + number.encode() + b"}"
    with pytest.raises(UpstreamUnavailable, match="expires_in is out of range"):
        parse_token_response(200, body)


def test_a_refresh_token_lifetime_beyond_float_is_the_invalid_answer_error() -> None:
    body = b'{"access_token": "at", "refresh_token": "rt", "x_rt": 1' + b"0" * 400 + b"}"
    with pytest.raises(UpstreamUnavailable, match="expires_in"):
        parse_answer(200, body, paths=TokenResponsePaths(refresh_token_expires_in="x_rt"))


async def test_a_refresh_answer_with_a_huge_expires_in_is_unavailable_and_recorded(broker: Broker) -> None:
    await broker.connect("alice")
    before = await broker.resolve("alice")
    broker.auth.fail_next("override", fields={"expires_in": HUGE})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert error_info(info.value).reason == "UPSTREAM_UNAVAILABLE"
    (row,) = broker.rows(
        "SELECT status, last_error, lease_owner FROM credentials WHERE user_id = ?", ("alice",)
    )
    assert row == {"status": "error", "last_error": "invalid_response", "lease_owner": None}
    assert (await broker.resolve("alice")).access_token == before.access_token
