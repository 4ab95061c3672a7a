"""Granted scopes sent as a JSON array of scope tokens.

Twitch (id.twitch.tv/oauth2/token) answers code and refresh grants with
``"scope": ["channel:read:subscriptions", "chat:read"]`` instead of RFC 6749's space-separated
string. That is the same information in another JSON shape: the broker reads it, each element
checked as a scope-token (appendix A.4), rather than refusing every Twitch connect as an invalid
answer. Anything else in the array (a non-string, a space, a non-NQCHAR) is still refused.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.errors import UpstreamUnavailable
from broker.oauth.rfc6749 import parse_token_response
from broker.providers.shaping import parse_answer
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info
from tests.test_token_exchange import EXCHANGE, exchange_doc, subject

GRANTED = ["repo", "read:user"]


def test_a_scope_array_is_read_as_scope_tokens() -> None:
    body = json.dumps({"access_token": "at", "scope": ["chat:read", "channel:moderate"]}).encode()
    assert parse_token_response(200, body).scope == ("chat:read", "channel:moderate")
    assert parse_answer(200, body, separator=",").scope == ("chat:read", "channel:moderate")


@pytest.mark.parametrize(
    "scope",
    [["a b"], [1], ["ok", None], ["\u00e9t\u00e9"], ['a"b'], [["nested"]], ["a\tb"], ["x" * (17 * 1024)]],
    ids=["space", "number", "null", "non-ascii", "quote", "nested", "tab", "too long"],
)
def test_a_scope_array_with_anything_but_scope_tokens_is_an_invalid_answer(scope: list[Any]) -> None:
    body = json.dumps({"access_token": "at", "scope": scope}).encode()
    with pytest.raises(UpstreamUnavailable, match="invalid answer: scope"):
        parse_token_response(200, body)


async def test_a_connect_and_a_refresh_answered_with_scope_arrays(broker: Broker) -> None:
    broker.auth.fail_next("override", fields={"scope": GRANTED})
    done = await broker.connect("alice")
    assert list(done.credential.scopes) == GRANTED
    broker.auth.fail_next("override", fields={"scope": ["repo"]})
    refreshed = await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert list(refreshed.credential.scopes) == ["repo"]
    assert list((await broker.resolve("alice")).scopes) == ["repo"]


async def test_a_scope_array_with_a_bad_element_stores_nothing(broker: Broker) -> None:
    broker.auth.fail_next("override", fields={"scope": ["repo", "read user"]})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.connect("alice")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(info.value).reason == "UPSTREAM_UNAVAILABLE"
    assert broker.query("SELECT COUNT(*) FROM credentials")[0][0] == 0


async def test_an_exchange_answered_with_a_scope_array(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await make_broker(upstreams=[exchange_doc(auth_server)])
    auth_server.fail_next("override", fields={"scope": ["read"]})
    resolved = await broker.resolve("alice", EXCHANGE, subject_token=subject(auth_server, "alice"))
    assert list(resolved.scopes) == ["read"]
