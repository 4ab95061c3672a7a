"""Verified user identity: tokens signed by a loopback IdP (RSA and EC), every rejection."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.errors import ConfigError
from tests.authserver import GRANT_TOKEN_EXCHANGE, AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc
from tests.idp import IdentityProvider
from tests.test_token_exchange import EXCHANGE, exchange_doc


def identity_doc(idp: IdentityProvider, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"issuer": idp.issuer, "audiences": ["broker"], "algorithms": ["RS256", "ES256"]}
    doc.update(overrides)
    return doc


@pytest.fixture
async def ibroker(make_broker: BrokerFactory, auth_server: AuthServer, idp: IdentityProvider) -> Broker:
    client = auth_server.new_client()
    return await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client), exchange_doc(auth_server)],
        identity=identity_doc(idp),
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_valid_tokens_rsa_and_ec_through_field_or_metadata(
    ibroker: Broker, auth_server: AuthServer, idp: IdentityProvider
) -> None:
    rsa = idp.sign(idp.claims("alice"), "rsa-1")
    # Valid after the clock moves an hour on, below.
    later = int(ibroker.clock.now()) + 3600
    ec = idp.sign(idp.claims("alice", exp=later + 600), "ec-1")
    auth_server.exchange_users[rsa] = "alice"
    auth_server.exchange_users[ec] = "alice"
    # The subject_token field is verified and then exchanged.
    first = await ibroker.resolve("alice", EXCHANGE, subject_token=rsa)
    (request,) = auth_server.token_requests(GRANT_TOKEN_EXCHANGE)
    assert request.form["subject_token"] == [rsa]
    # Bearer metadata works the same, and is the token exchanged when the field is empty.
    ibroker.clock.advance(3600)
    second = await ibroker.stub.Resolve(
        pb.ResolveRequest(user_id="alice", upstream=EXCHANGE), metadata=bearer(ec)
    )
    assert auth_server.token_requests(GRANT_TOKEN_EXCHANGE)[1].form["subject_token"] == [ec]
    assert second.access_token != first.access_token
    # Other RPCs that act for a user need the token too.
    started = await ibroker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM), metadata=bearer(ec)
    )
    assert started.state
    assert idp.jwks_requests == 1  # fetched once, then cached
    # Discovery was used: no jwks_uri in the config.
    assert idp.requests[0] == "/.well-known/openid-configuration"


async def test_every_rpc_needs_the_token(ibroker: Broker) -> None:
    calls = [
        ibroker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM)
        ),
        ibroker.stub.Complete(pb.CompleteRequest(user_id="alice", state="s" * 43, code="c")),
        ibroker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM)),
        ibroker.stub.Resolve(pb.ResolveRequest(user_id="alice", upstream=UPSTREAM)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(info.value).metadata["problem"] == "missing"


def _rejections(idp: IdentityProvider) -> list[tuple[str, str, str]]:
    """(name, token, expected problem) for every way a user token is refused."""
    other = idp.add_key("rsa", "rsa-1", publish=False)  # same kid, key the IdP never published
    now_claims = idp.claims
    return [
        ("bad signature", idp.sign(now_claims("alice"), "rsa-1", key=other), "signature"),
        ("tampered", _tamper(idp.sign(now_claims("alice"), "ec-1")), "signature"),
        ("wrong issuer", idp.sign(now_claims("alice", iss="https://evil.example"), "rsa-1"), "issuer"),
        ("wrong audience", idp.sign(now_claims("alice", aud=["someone-else"]), "rsa-1"), "audience"),
        ("expired", idp.sign(now_claims("alice", exp=int(idp_time()) - 120), "ec-1"), "expired"),
        ("no exp", idp.sign(now_claims("alice", exp=None), "ec-1"), "claims"),
        ("not yet valid", idp.sign(now_claims("alice", nbf=int(idp_time()) + 600), "rsa-1"), "not_yet_valid"),
        ("unknown kid", idp.sign(now_claims("alice"), "nope", key=other), "unknown_key"),
        ("alg none", idp.unsigned(now_claims("alice"), "rsa-1"), "algorithm"),
        ("hmac with public key", idp.hmac_with_public_key(now_claims("alice"), "rsa-1"), "algorithm"),
        ("rs384 not allowed", idp.sign(now_claims("alice"), "rsa-1", alg="RS384"), "algorithm"),
        ("not a jwt", "not-a-jwt", "malformed"),
    ]


def idp_time() -> float:
    import time

    return time.time()


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    import base64
    import json

    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


async def test_every_identity_rejection(
    ibroker: Broker, idp: IdentityProvider, auth_server: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="credential_broker")
    rejections = _rejections(idp)
    for name, token, problem in rejections:
        for how in ("field", "metadata"):
            request = pb.ResolveRequest(user_id="alice", upstream=UPSTREAM)
            if how == "field":
                request.subject_token = token
                call = ibroker.stub.Resolve(request)
            else:
                call = ibroker.stub.Resolve(request, metadata=bearer(token))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            detail = error_info(info.value)
            assert (detail.reason, detail.metadata["problem"]) == ("USER_TOKEN_INVALID", problem), name
            assert token not in info.value.details() and token not in str(detail)
    assert not any(token in caplog.text for _, token, _ in rejections)
    assert auth_server.token_requests() == []


async def test_user_mismatch_is_permission_denied(ibroker: Broker, idp: IdentityProvider) -> None:
    bobs = idp.sign(idp.claims("bob"), "rsa-1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ibroker.resolve("alice", UPSTREAM, subject_token=bobs)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(info.value).reason == "USER_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as complete:
        await ibroker.stub.Complete(
            pb.CompleteRequest(user_id="alice", state="s" * 43, code="c"), metadata=bearer(bobs)
        )
    assert error_info(complete.value).reason == "USER_MISMATCH"


async def test_keys_refetched_on_unknown_kid_at_most_once_per_interval(
    ibroker: Broker, idp: IdentityProvider
) -> None:
    await ibroker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM),
        metadata=bearer(idp.sign(idp.claims("alice"), "rsa-1")),
    )
    assert idp.jwks_requests == 1
    # A rotated-in key: the first token with its kid triggers a refetch... unless too soon.
    idp.add_key("ec", "ec-2")
    fresh = idp.sign(idp.claims("alice"), "ec-2")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ibroker.resolve("alice", UPSTREAM, subject_token=fresh)
    assert error_info(info.value).metadata["problem"] == "unknown_key"
    assert idp.jwks_requests == 1  # within the interval: no refetch
    ibroker.clock.advance(61)
    for _ in range(3):
        await ibroker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM), metadata=bearer(fresh)
        )
    assert idp.jwks_requests == 2
    # Unknown kids keep failing without hammering the IdP.
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError):
            await ibroker.resolve(
                "alice", UPSTREAM, subject_token=idp.sign(idp.claims(), "gone", key=idp.keys["ec-1"])
            )
    assert idp.jwks_requests == 2


async def test_custom_user_claim_and_jwks_uri(
    make_broker: BrokerFactory, auth_server: AuthServer, idp: IdentityProvider
) -> None:
    client = auth_server.new_client()
    broker = await make_broker(
        client=client,
        upstreams=[upstream_doc(auth_server, client)],
        identity=identity_doc(idp, jwks_uri=idp.jwks_uri, user_claim="email", audiences=["other", "broker"]),
    )
    token = idp.sign(idp.claims("ignored-sub", email="alice@example.com"), "ec-1")
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice@example.com", upstream=UPSTREAM),
        metadata=bearer(token),
    )
    assert started.state
    assert "/.well-known/openid-configuration" not in idp.requests


async def test_discovery_naming_another_issuer_is_refused(
    make_broker: BrokerFactory, auth_server: AuthServer, idp: IdentityProvider
) -> None:
    idp.discovery_issuer = "https://evil.example"
    client = auth_server.new_client()
    broker = await make_broker(
        client=client, upstreams=[upstream_doc(auth_server, client)], identity=identity_doc(idp)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve("alice", UPSTREAM, subject_token=idp.sign(idp.claims(), "rsa-1"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(info.value).reason == "IDENTITY_PROVIDER_UNAVAILABLE"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithms": ["none"]}, "identity.algorithms: 'none' is not allowed"),
        ({"algorithms": ["HS256"]}, "identity.algorithms: 'HS256' is not allowed"),
        ({"issuer": "http://idp.example"}, "identity.issuer: must use https"),
        ({"jwks_uri": "http://idp.example/jwks"}, "identity.jwks_uri: must use https"),
        ({"audiences": []}, "identity.audiences: needs at least one"),
    ],
)
async def test_identity_config_errors(
    make_broker: BrokerFactory, idp: IdentityProvider, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        await make_broker(identity=identity_doc(idp, **change))
    assert message in str(info.value)


async def test_no_identity_block_trusts_the_caller(broker: Broker) -> None:
    # Without identity: config, a bearer header is neither needed nor used.
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=UPSTREAM),
        metadata=bearer(secrets.token_urlsafe(8)),
    )
    assert started.state
