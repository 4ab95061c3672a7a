"""The broker against a real, independently written OpenID provider (``oidc-provider``, npm).

One provider process serves the whole module (tests/oidc_provider.py); each test gets its own
broker (real gRPC server, real SQLite file) whose upstream names only the provider's ``issuer``:
endpoints, RFC 9207 support and the revocation endpoint come from its discovery document. The
login and consent pages are driven by posting their forms, as a browser would. What the provider
says about a token (RFC 7662 introspection) is the judge of whether it is live.

The provider follows OpenID Connect Core 1.0 section 11: it honours ``offline_access`` only when
the authorization request also says ``prompt=consent``. The broker has no setting for extra
authorization parameters, but it keeps the configured ``authorization_endpoint``'s own query, so
an operator sets ``authorization_endpoint: ISSUER/auth?prompt=consent``; the tests do the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests import leakcheck
from tests.conftest import Broker, BrokerFactory, error_info
from tests.oidc_provider import OidcClient, OidcProvider, ProviderUnavailable, in_ci

UPSTREAM = "oidc"
ALL_SCOPES = ["openid", "offline_access", "api:read"]


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcProvider]:
    """One provider for the module; a missing node/npm is a skip locally and a failure in CI."""
    try:
        provider = OidcProvider.start()
    except ProviderUnavailable as exc:
        if in_ci():
            pytest.fail(f"the oidc-provider tests must run in CI: {exc}")
        pytest.skip(str(exc))
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(autouse=True)
def _provider_secrets(oidc: OidcProvider) -> Iterator[None]:
    """After each test, every secret the provider has minted joins the suite's leak check."""
    yield
    leakcheck.add_secret(*oidc.secrets())


def upstream(
    oidc: OidcProvider, client: OidcClient, scopes: list[str], *, consent_prompt: bool = True
) -> dict[str, Any]:
    ab: dict[str, Any] = {
        "mode": "oauth_connect",
        "issuer": oidc.issuer,
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        "token_endpoint_auth_method": "client_secret_basic",
        "redirect_uri": client.redirect_uri,
        "scopes": scopes,
    }
    if consent_prompt:
        ab["authorization_endpoint"] = oidc.issuer + "/auth?prompt=consent"
    return {"name": UPSTREAM, "url": "https://api.oidc.test", "auth_broker": ab}


async def start(
    make_broker: BrokerFactory,
    oidc: OidcProvider,
    scopes: list[str],
    *,
    always_refresh: bool = False,
    consent_prompt: bool = True,
) -> tuple[Broker, OidcClient]:
    client = oidc.client(always_refresh=always_refresh)
    broker = await make_broker(upstreams=[upstream(oidc, client, scopes, consent_prompt=consent_prompt)])
    return broker, client


async def connect(broker: Broker, oidc: OidcProvider, user: str) -> pb.CompleteResponse:
    """BuildAuthorizationURL, the provider's login and consent pages, then Complete with iss."""
    started = await broker.start_flow(user, UPSTREAM)
    assert "code_challenge_method=S256" in started.authorization_url
    callback = await asyncio.to_thread(oidc.authorize, started.authorization_url, user)
    assert callback.get("state") == started.state, callback.get("error")
    assert callback["iss"] == oidc.issuer  # RFC 9207: the provider names itself
    return await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user, iss=callback["iss"])
    )


async def resolve(broker: Broker, user: str, **kw: Any) -> pb.ResolveResponse:
    answer = await broker.resolve(user, UPSTREAM, **kw)
    leakcheck.add_secret(answer.access_token)
    return answer


def stored_refresh_token(broker: Broker, user: str) -> str | None:
    """The refresh token the broker holds, opened with its own vault (the test has the keyring)."""
    upstream_key = broker.app.config.upstreams[0].key
    found = broker.app.vault.get(user, upstream_key)
    assert found is not None
    token = found[0].secrets.refresh_token
    if token:
        leakcheck.add_secret(token)
    return token


async def test_connect_flow_and_resolve_give_a_token_the_provider_says_is_active(
    make_broker: BrokerFactory, oidc: OidcProvider
) -> None:
    broker, client = await start(make_broker, oidc, ALL_SCOPES)
    # Discovery filled in what the config left out.
    auth = broker.app.config.upstreams[0].auth_broker
    assert auth.token_endpoint == oidc.token_endpoint
    assert auth.revocation_endpoint == oidc.revocation_endpoint
    assert auth.authorization_response_iss_parameter_supported is True

    completed = await connect(broker, oidc, "connect-user")
    assert set(completed.credential.scopes) >= {"openid", "api:read"}

    answer = await resolve(broker, "connect-user")
    assert answer.token_type == "Bearer"
    assert answer.header_value == f"Bearer {answer.access_token}"
    seen = oidc.introspect(client, answer.access_token)
    assert seen["active"] is True
    assert seen["sub"] == "connect-user" and seen["client_id"] == client.client_id
    assert stored_refresh_token(broker, "connect-user")  # offline_access was granted


@pytest.mark.parametrize(
    ("always_refresh", "consent_prompt"),
    [
        # The case: the provider drops offline_access (no prompt=consent), grants
        # "openid api:read", and issues a refresh token anyway (its policy for this client).
        pytest.param(True, False, id="provider-granted-fewer-scopes"),
        # offline_access granted: the refresh token's scope has every configured scope.
        pytest.param(False, True, id="all-scopes-granted"),
    ],
)
async def test_refresh_twice_then_resolve_with_openid_offline_access_api_scopes(
    make_broker: BrokerFactory, oidc: OidcProvider, always_refresh: bool, consent_prompt: bool
) -> None:
    """Item 3: a refresh sends no scope (RFC 6749 section 6), so the original grant stands."""
    broker, client = await start(
        make_broker, oidc, ALL_SCOPES, always_refresh=always_refresh, consent_prompt=consent_prompt
    )
    user = f"item3-{always_refresh}"
    completed = await connect(broker, oidc, user)
    granted = set(completed.credential.scopes)
    assert granted >= {"openid", "api:read"}
    if not consent_prompt:
        assert "offline_access" not in granted  # OpenID Connect Core 1.0 section 11

    first = stored_refresh_token(broker, user)
    assert first
    for _ in range(2):
        refreshed = await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
        assert set(refreshed.credential.scopes) == granted
    latest = stored_refresh_token(broker, user)
    assert latest and latest != first  # rotated on each use

    answer = await resolve(broker, user)
    assert oidc.introspect(client, answer.access_token)["active"] is True
    assert oidc.introspect(client, latest)["active"] is True


async def test_a_replayed_refresh_token_revokes_the_grant_and_the_broker_asks_to_reconnect(
    make_broker: BrokerFactory, oidc: OidcProvider
) -> None:
    """Rotation with reuse detection, as the provider does it. The broker presents each refresh
    token once; when someone else replays an old one (a stolen copy), the provider revokes the
    whole grant, and the broker's next refresh ends in RECONNECT_REQUIRED, not a retry loop."""
    broker, client = await start(make_broker, oidc, ALL_SCOPES)
    user = "reuse-user"
    await connect(broker, oidc, user)
    old = stored_refresh_token(broker, user)
    assert old

    await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
    current = stored_refresh_token(broker, user)
    assert current and current != old
    answer = await resolve(broker, user)
    assert oidc.introspect(client, answer.access_token)["active"] is True
    assert oidc.introspect(client, current)["active"] is True

    # The attacker's replay of the consumed token: refused, and the grant is gone.
    replay = await asyncio.to_thread(oidc.refresh, client, old)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert oidc.introspect(client, current)["active"] is False
    assert oidc.introspect(client, answer.access_token)["active"] is False

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "RECONNECT_REQUIRED"
    listed = await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id=user))
    assert [c.status for c in listed.connections] == ["needs_reauth"]
    # Reconnecting works: a new grant.
    await connect(broker, oidc, user)
    assert oidc.introspect(client, (await resolve(broker, user)).access_token)["active"] is True


@pytest.mark.parametrize(
    ("scopes", "consent_prompt"),
    [
        pytest.param(["openid", "api:read"], True, id="not-requested"),
        # Asked for without prompt=consent: the provider ignores it (OIDC Core 1.0 section 11).
        pytest.param(ALL_SCOPES, False, id="requested-without-consent-prompt"),
    ],
)
async def test_without_offline_access_there_is_no_refresh_token_and_the_broker_says_reconnect(
    make_broker: BrokerFactory, oidc: OidcProvider, scopes: list[str], consent_prompt: bool
) -> None:
    broker, client = await start(make_broker, oidc, scopes, consent_prompt=consent_prompt)
    user = f"online-only-{consent_prompt}"
    completed = await connect(broker, oidc, user)
    assert "offline_access" not in completed.credential.scopes
    assert stored_refresh_token(broker, user) is None

    answer = await resolve(broker, user)
    assert oidc.introspect(client, answer.access_token)["active"] is True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
    assert error_info(refused.value).reason == "RECONNECT_REQUIRED"
    assert error_info(refused.value).metadata["authorization_url"].startswith(oidc.issuer + "/auth?")

    broker.clock.advance(completed.credential.expires_at.seconds - broker.clock.now() + 1)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await resolve(broker, user)
    assert error_info(expired.value).reason == "RECONNECT_REQUIRED"


async def test_with_offline_access_an_expired_token_is_refreshed_on_resolve(
    make_broker: BrokerFactory, oidc: OidcProvider
) -> None:
    broker, client = await start(make_broker, oidc, ALL_SCOPES)
    user = "offline-user"
    completed = await connect(broker, oidc, user)
    assert "offline_access" in completed.credential.scopes
    first = await resolve(broker, user)

    broker.clock.advance(completed.credential.expires_at.seconds - broker.clock.now() + 1)
    second = await resolve(broker, user)
    assert second.access_token != first.access_token
    assert oidc.introspect(client, second.access_token)["active"] is True


async def test_disconnect_revokes_at_the_provider(make_broker: BrokerFactory, oidc: OidcProvider) -> None:
    """RFC 7009 at the endpoint discovery found: both tokens are dead at the provider after."""
    broker, client = await start(make_broker, oidc, ALL_SCOPES)
    user = "disconnect-user"
    await connect(broker, oidc, user)
    refresh_token = stored_refresh_token(broker, user)
    assert refresh_token
    access_token = (await resolve(broker, user)).access_token
    assert oidc.introspect(client, access_token)["active"] is True

    done = await broker.stub.Disconnect(pb.DisconnectRequest(user_id=user, upstream=UPSTREAM))
    assert done.deleted
    assert [(r.token_type_hint, r.outcome) for r in done.revocations] == [
        ("refresh_token", "revoked"),
        ("access_token", "revoked"),
    ]
    assert oidc.introspect(client, access_token)["active"] is False
    assert oidc.introspect(client, refresh_token)["active"] is False
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await resolve(broker, user)
    assert error_info(gone.value).reason == "NOT_CONNECTED"


async def test_disconnect_all_revokes_at_the_provider(make_broker: BrokerFactory, oidc: OidcProvider) -> None:
    """DisconnectAll (offboarding): the provider's introspection says both tokens are dead."""
    broker, client = await start(make_broker, oidc, ALL_SCOPES)
    user, other = "offboarded-user", "staying-user"
    tokens = {}
    for who in (user, other):
        await connect(broker, oidc, who)
        refresh_token = stored_refresh_token(broker, who)
        assert refresh_token
        tokens[who] = [(await resolve(broker, who)).access_token, refresh_token]
        assert [oidc.introspect(client, t)["active"] for t in tokens[who]] == [True, True]

    done = await broker.stub.DisconnectAll(pb.DisconnectAllRequest(user_id=user))
    assert [(r.upstream, r.deleted) for r in done.results] == [(UPSTREAM, True)]
    assert [(r.token_type_hint, r.outcome) for r in done.results[0].revocations] == [
        ("refresh_token", "revoked"),
        ("access_token", "revoked"),
    ]
    assert [oidc.introspect(client, t)["active"] for t in tokens[user]] == [False, False]
    assert [oidc.introspect(client, t)["active"] for t in tokens[other]] == [True, True]
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await resolve(broker, user)
    assert error_info(gone.value).reason == "NOT_CONNECTED"


@pytest.mark.parametrize("iss", ["http://127.0.0.1:1", "", "http://127.0.0.1:{port}/"])
async def test_a_wrong_or_missing_iss_is_refused_and_nothing_is_stored(
    make_broker: BrokerFactory, oidc: OidcProvider, iss: str
) -> None:
    """RFC 9207: the provider says (in its metadata) that it sends iss; the callback's iss must be
    its issuer exactly. A mix-up is refused before the code is exchanged."""
    broker, _ = await start(make_broker, oidc, ALL_SCOPES)
    user = "iss-user"
    started = await broker.start_flow(user, UPSTREAM)
    callback = await asyncio.to_thread(oidc.authorize, started.authorization_url, user)
    assert callback["iss"] == oidc.issuer
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.stub.Complete(
            pb.CompleteRequest(
                state=started.state, code=callback["code"], user_id=user, iss=iss.format(port=oidc.port)
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).reason == "ISSUER_MISMATCH"
    assert broker.query("SELECT COUNT(*) FROM credentials") == [(0,)]
    listed = await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id=user))
    assert [c.status for c in listed.connections] == ["not_connected"]
