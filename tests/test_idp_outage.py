"""An identity provider outage is not a bad token.

The real loopback IdP (tests/idp.py) goes down (connections refused, or HTTP 500) and comes back.
While the broker cannot fetch its keys, users get UNAVAILABLE / IDENTITY_PROVIDER_UNAVAILABLE,
never USER_TOKEN_INVALID; a failed fetch is retried after 1 s, doubling up to
``jwks_min_refetch_seconds``, so users get in again soon after the provider is back. The
broker's clock is a ManualClock: "seconds" below are the clock's.
"""

from __future__ import annotations

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info
from tests.idp import IdentityProvider
from tests.test_identity import identity_doc

OK = "OK"
DOWN = ("UNAVAILABLE", "IDENTITY_PROVIDER_UNAVAILABLE")


@pytest.fixture
async def ibroker(make_broker: BrokerFactory, idp: IdentityProvider) -> Broker:
    return await make_broker(identity=identity_doc(idp))


async def call(broker: Broker, token: str) -> str | tuple[str, str]:
    """BuildAuthorizationURL for alice with ``token``: OK, or (status code, reason)."""
    try:
        await broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, error_info(exc).reason
    return OK


@pytest.mark.parametrize("how", ["refuse", "500", "nested"])
async def test_outage_before_the_first_fetch_is_unavailable_then_recovers_within_a_second(
    ibroker: Broker, idp: IdentityProvider, how: str
) -> None:
    token = idp.sign(idp.claims("alice"), "rsa-1")
    idp.go_down(how)
    assert await call(ibroker, token) == DOWN
    # Before the retry is due: still "the provider is unavailable", not "your token is bad".
    assert await call(ibroker, token) == DOWN
    ibroker.clock.advance(0.5)
    assert await call(ibroker, token) == DOWN
    idp.come_up()
    ibroker.clock.advance(0.5)
    assert await call(ibroker, token) == OK


@pytest.mark.parametrize("how", ["refuse", "500"])
async def test_outage_with_cached_keys_keeps_known_keys_and_defers_new_ones(
    ibroker: Broker, idp: IdentityProvider, how: str
) -> None:
    known = idp.sign(idp.claims("alice"), "rsa-1")
    assert await call(ibroker, known) == OK
    idp.add_key("ec", "ec-2")  # rotated in while the provider is about to fail
    rotated = idp.sign(idp.claims("alice"), "ec-2")
    idp.go_down(how)
    ibroker.clock.advance(61)  # a refetch for the new key id is due
    for _ in range(3):
        assert await call(ibroker, rotated) == DOWN
        assert await call(ibroker, known) == OK  # cached keys keep working through the outage
    idp.come_up()
    ibroker.clock.advance(1)
    assert await call(ibroker, rotated) == OK


async def test_failed_fetches_back_off_from_one_second_doubling_to_the_refetch_interval(
    ibroker: Broker, idp: IdentityProvider
) -> None:
    token = idp.sign(idp.claims("alice"), "rsa-1")
    idp.go_down("500")
    attempts: list[int] = []
    for second in range(131):
        before = len(idp.requests)
        assert await call(ibroker, token) == DOWN, second
        if len(idp.requests) > before:
            attempts.append(second)
        ibroker.clock.advance(1)
    # 1, 2, 4, 8, 16, 32 s, then the 60 s jwks_min_refetch_seconds.
    assert attempts == [0, 1, 3, 7, 15, 31, 63, 123]
    idp.come_up()  # at 131 s; the next retry is due at 183 s
    for second in range(131, 190):
        answer = await call(ibroker, token)
        if answer == OK:
            break
        assert answer == DOWN, second
        ibroker.clock.advance(1)
    assert second == 183


async def test_an_unknown_key_from_a_working_provider_is_still_a_bad_token(
    ibroker: Broker, idp: IdentityProvider
) -> None:
    stranger = idp.add_key("ec", "stranger", publish=False)
    token = idp.sign(idp.claims("alice"), "stranger", key=stranger)
    for _ in range(2):
        assert await call(ibroker, token) == ("UNAUTHENTICATED", "USER_TOKEN_INVALID")
    ibroker.clock.advance(2)
    assert await call(ibroker, token) == ("UNAUTHENTICATED", "USER_TOKEN_INVALID")
    assert idp.jwks_requests == 1  # a successful fetch is not repeated within the interval
