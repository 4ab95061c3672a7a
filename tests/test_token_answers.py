"""Token endpoint answers are checked field by field (RFC 6749 appendix A) before anything is stored.

A property test drives the parser with any JSON object; end-to-end cases send each hostile answer
from the real loopback authorization server to a real broker and check that nothing was stored,
the user's stored credential still resolves, and the server keeps serving.
"""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.errors import TokenRequestRejected, UnsupportedTokenType, UpstreamUnavailable
from broker.oauth.rfc6749 import TokenResponse, parse_token_response
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc
from tests.test_token_exchange import exchange_doc, obo_doc, subject

# The syntax, written out here from RFC 6749 appendix A (not imported from the code under test).
VSCHAR = re.compile(r"[\x20-\x7e]+")  # A.12 access-token, A.17 refresh-token
NQCHAR = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # A.4 scope-token
INVALID = "the token endpoint sent an invalid answer"

# -- the parser ------------------------------------------------------------------------------

text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="ascii"), max_size=40),
    st.sampled_from(
        [
            "",
            "Bearer",
            "bearer",
            "BEARER",
            "DPoP",
            "mac",
            "N_A",
            "Bearer\r\nX-Injected: 1",
            "Bearer\x00",
            "\ud800",
            "repo read:user",
            "repo\x07read",
            " repo  read:user ",
            "repo\tread",
            "a\u2028b",
            "\u00e9t\u00e9",
            "3600",
            "\u0663\u0666\u0660\u0660",  # Arabic-Indic digits: str.isdigit() is True
            "\u00b2",  # superscript two: isdigit() True, int() refuses it
            "9" * 5000,  # int() refuses more than 4300 digits
        ]
    ),
)
values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(allow_nan=True, allow_infinity=True),
        text,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = ("access_token", "token_type", "expires_in", "refresh_token", "scope", "issued_token_type")
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=8)


def _check_syntax(answer: TokenResponse) -> None:
    assert VSCHAR.fullmatch(answer.access_token) and len(answer.access_token) <= 64 * 1024
    assert answer.refresh_token is None or (
        VSCHAR.fullmatch(answer.refresh_token) and len(answer.refresh_token) <= 64 * 1024
    )
    assert answer.token_type == "Bearer"  # the only type the broker can send
    assert answer.scope is None or (
        len(answer.scope) >= 1
        and all(NQCHAR.fullmatch(s) for s in answer.scope)
        and len(" ".join(answer.scope)) <= 16 * 1024
    )
    assert answer.expires_in is None or (
        type(answer.expires_in) is int and 0 <= answer.expires_in <= 10 * 365 * 24 * 3600
    )
    assert answer.issued_token_type is None or re.fullmatch(r"[\x21-\x7e]{1,512}", answer.issued_token_type)
    # Everything must survive the store (JSON) and the wire (protobuf strings are UTF-8).
    for value in (answer.access_token, answer.refresh_token, answer.token_type, *(answer.scope or ())):
        if value is not None:
            value.encode("utf-8")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=objects)
@example(document={"access_token": "at", "token_type": "Bearer\r\nX: 1"})
@example(document={"access_token": "at", "scope": "\ud800"})
@example(document={"access_token": "at", "expires_in": "\u00b2"})
@example(document={"access_token": "at", "expires_in": "9" * 5000})
@example(document={"access_token": "at", "token_type": "B" * 60 * 1024})
@example(document={"access_token": "at", "token_type": "dpop"})
def test_any_json_object_is_a_checked_answer_or_the_invalid_answer_error(document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    try:
        answer = parse_token_response(200, body)
    except UnsupportedTokenType as exc:
        assert exc.code == "UNSUPPORTED_TOKEN_TYPE"
        assert isinstance(document.get("token_type"), str)
        assert document["token_type"].lower() != "bearer"
        assert "\r" not in exc.message and "\n" not in exc.message and len(exc.message) < 400
        return
    except UpstreamUnavailable as exc:
        assert type(exc) is UpstreamUnavailable and exc.message.startswith(INVALID), exc.message
        return
    _check_syntax(answer)
    assert answer.access_token == document["access_token"]


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200))
def test_any_body_is_an_answer_or_the_invalid_answer_error(body: bytes) -> None:
    try:
        _check_syntax(parse_token_response(200, body))
    except UpstreamUnavailable as exc:
        assert exc.message.startswith(INVALID) or exc.code == "UNSUPPORTED_TOKEN_TYPE", exc.message


@pytest.mark.parametrize("status", [200, 400])
def test_deeply_nested_json_is_an_invalid_answer(status: int) -> None:
    # Well under the default 1 MiB answer cap, and deeper than json.loads can recurse.
    for body in (b"[" * 200_000, b'{"a":' * 100_000):
        try:
            parse_token_response(status, body)
        except UpstreamUnavailable as exc:
            assert status == 200 and exc.message == f"{INVALID}: not JSON"
        except TokenRequestRejected as exc:
            assert status == 400 and exc.oauth_error is None


@pytest.mark.parametrize("spelling", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_token_type_is_matched_without_case_and_normalised(spelling: str) -> None:
    answer = parse_token_response(200, json.dumps({"access_token": "at", "token_type": spelling}).encode())
    assert answer.token_type == "Bearer"


@pytest.mark.parametrize("kind", ["DPoP", "mac", "N_A", "PoP", "urn:example:type"])
def test_unsupported_token_type_is_refused_by_name(kind: str) -> None:
    with pytest.raises(UnsupportedTokenType) as info:
        parse_token_response(200, json.dumps({"access_token": "at", "token_type": kind}).encode())
    assert repr(kind) in info.value.message and "Bearer" in info.value.message


def test_scope_words_are_split_on_spaces_only() -> None:
    answer = parse_token_response(
        200, json.dumps({"access_token": "a", "scope": " repo  read:user "}).encode()
    )
    assert answer.scope == ("repo", "read:user")
    for bad in ("repo\tread", "repo\nread", 'a"b', "a\\b", "caf\u00e9"):
        with pytest.raises(UpstreamUnavailable, match="scope"):
            parse_token_response(200, json.dumps({"access_token": "a", "scope": bad}).encode())


# -- end to end: a real broker and the real loopback authorization server ---------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


CASES: dict[str, dict[str, Any]] = {
    "token_type CR/LF": {"token_type": "Bearer\r\nX-Injected: yes"},
    "token_type NUL": {"token_type": "Bearer\x00"},
    "token_type 60 KiB": {"token_type": "B" * 60 * 1024},
    "scope control characters": {"scope": "repo\x07 read:user\x1b[2J"},
    "scope lone surrogate": {"scope": "\ud800"},
    "access_token lone surrogate": {"access_token": "at_\udfff"},
    "refresh_token with a newline": {"refresh_token": "rt\nsecond"},
}


def _row(broker: Broker, user: str = "alice") -> dict[str, Any]:
    (row,) = broker.rows("SELECT token_type, scopes, sealed FROM credentials WHERE user_id=?", (user,))
    return row


async def _serving(broker: Broker) -> None:
    health = health_pb2_grpc.HealthStub(broker.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("case", sorted(CASES))
async def test_hostile_refresh_answer_stores_nothing(broker: Broker, case: str) -> None:
    await broker.connect("alice")
    before = await broker.resolve("alice")
    row = _row(broker)
    broker.auth.fail_next("override", fields=CASES[case])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, case
    assert error_info(info.value).reason == "UPSTREAM_UNAVAILABLE"
    assert (info.value.details() or "").startswith(INVALID)
    field = next(iter(CASES[case]))
    assert field in (info.value.details() or "")
    # Nothing stored: the row still holds the same sealed secrets and clear columns.
    assert _row(broker) == row
    # Every later call for this user works, and answers with the credential stored before.
    for _ in range(3):
        after = await broker.resolve("alice")
        assert (after.access_token, after.token_type, list(after.scopes)) == (
            before.access_token,
            "Bearer",
            list(before.scopes),
        )
    await _serving(broker)


async def test_hostile_answer_to_a_connect_stores_nothing(broker: Broker) -> None:
    for fields in ({"scope": "\ud800"}, {"token_type": "Bearer\r\n"}):
        broker.auth.fail_next("override", fields=fields)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.connect("bob")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert broker.query("SELECT COUNT(*) FROM credentials")[0][0] == 0
    # The user can connect once the server answers properly.
    await broker.connect("bob")
    assert (await broker.resolve("bob")).token_type == "Bearer"


async def test_lowercase_bearer_is_stored_and_served_as_bearer(broker: Broker) -> None:
    broker.auth.fail_next("override", fields={"token_type": "bearer"})
    done = await broker.connect("alice")
    assert done.credential.token_type == "Bearer"
    assert _row(broker)["token_type"] == "Bearer"
    resolved = await broker.resolve("alice")
    assert resolved.token_type == "Bearer" and resolved.header_value == f"Bearer {resolved.access_token}"


async def test_dpop_token_is_refused_by_name_and_never_sent_as_bearer(broker: Broker) -> None:
    broker.auth.fail_next("override", fields={"token_type": "DPoP"})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.connect("alice")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(info.value).reason == "UNSUPPORTED_TOKEN_TYPE"
    assert "'DPoP'" in (info.value.details() or "")
    assert broker.query("SELECT COUNT(*) FROM credentials")[0][0] == 0
    with pytest.raises(grpc.aio.AioRpcError) as later:
        await broker.resolve("alice")
    assert error_info(later.value).reason == "NOT_CONNECTED"
    # A stored credential survives a DPoP answer to its refresh.
    await broker.connect("alice")
    before = await broker.resolve("alice")
    broker.auth.fail_next("override", fields={"token_type": "dpop"})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM))
    assert error_info(refused.value).reason == "UNSUPPORTED_TOKEN_TYPE"
    assert (await broker.resolve("alice")).access_token == before.access_token
    await _serving(broker)


@pytest.mark.parametrize("which", ["token_exchange", "entra_obo"])
async def test_exchange_answers_go_through_the_same_checks(
    make_broker: BrokerFactory, auth_server: AuthServer, which: str
) -> None:
    client = auth_server.new_client()
    doc = exchange_doc(auth_server) if which == "token_exchange" else obo_doc(auth_server)
    broker = await make_broker(client=client, upstreams=[upstream_doc(auth_server, client), doc])
    name = doc["name"]
    token = subject(auth_server, "alice")
    for fields in ({"token_type": "DPoP"}, {"scope": "\ud800"}, {"token_type": "Bearer\r\n"}):
        auth_server.fail_next("override", fields=fields)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await broker.resolve("alice", name, subject_token=token)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, fields
        assert broker.query("SELECT COUNT(*) FROM credentials")[0][0] == 0
    auth_server.fail_next("override", fields={"token_type": "BEARER"})
    good = await broker.resolve("alice", name, subject_token=token)
    assert good.token_type == "Bearer"
    assert auth_server.access_token_info(good.access_token) is not None
    assert [r["token_type"] for r in broker.rows("SELECT token_type FROM credentials")] == ["Bearer"]
    await _serving(broker)


# -- records an older version stored ----------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"scopes": ("read", "\ud800")},
        {"token_type": "Bearer\r\nX-Injected: 1"},
        {"secrets": "at_\udfff"},
    ],
    ids=["scope lone surrogate", "token_type CR/LF", "access_token lone surrogate"],
)
async def test_a_hostile_record_stored_by_an_older_version_fails_closed_for_its_user(
    broker: Broker, change: dict[str, Any]
) -> None:
    """Before answers were checked, a hostile answer could be stored as is. Such a record must
    not answer UNKNOWN on every call: it fails closed for its own user (RECONNECT_REQUIRED, a
    reconnect replaces it), and everyone else keeps resolving."""
    import dataclasses

    from broker.models import Secrets

    await broker.connect("alice")
    await broker.connect("bob")
    vault = broker.app.vault
    found = vault.get("alice", broker.app.config.upstreams[0].key)
    assert found is not None
    credential, row = found
    if "secrets" in change:
        change = {"secrets": Secrets(change["secrets"], credential.secrets.refresh_token)}
    # What an older version's refresh wrote: the same row, sealed with the hostile value.
    assert vault.save(dataclasses.replace(credential, **change), row.generation, credential.updated_at)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value).reason == "RECONNECT_REQUIRED"
    assert (await broker.resolve("bob")).access_token
    await _serving(broker)
    await broker.connect("alice")  # a reconnect replaces the record
    assert (await broker.resolve("alice")).access_token
