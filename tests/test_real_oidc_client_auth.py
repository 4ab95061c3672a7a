"""private_key_jwt (RFC 7523 section 2.2) and pushed authorization requests (RFC 9126) against a
real, independently written OpenID provider (``oidc-provider``, npm; tests/oidc_provider.py).

The provider registers clients that have no secret: each authenticates with a JWT signed by a
key this test generates at run time (the provider holds only its public JWK), and must push its
authorization requests (``require_pushed_authorization_requests``). Connect, refresh and
revocation go through the broker's real gRPC server; the provider's RFC 7662 introspection
(asked by another, secret-holding client) judges whether each token is live.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests import leakcheck
from tests.client_keys import ClientKey
from tests.conftest import Broker, BrokerFactory
from tests.oidc_provider import OidcClient, OidcProvider, ProviderUnavailable, in_ci

UPSTREAM = "oidc"
SCOPES = ["openid", "offline_access", "api:read"]


@pytest.fixture(scope="module")
def keys() -> dict[str, ClientKey]:
    return {alg: ClientKey.generate(alg) for alg in ("RS256", "ES256")}


@pytest.fixture(scope="module")
def clients(keys: dict[str, ClientKey]) -> dict[str, OidcClient]:
    return {
        alg: OidcClient(
            f"pkjwt-{alg.lower()}-{secrets.token_hex(4)}",
            secrets.token_urlsafe(24),  # registered nowhere: the client has no secret
            jwks={"keys": [key.jwk()]},
            require_par=True,
        )
        for alg, key in keys.items()
    }


@pytest.fixture(scope="module")
def oidc(clients: dict[str, OidcClient]) -> Iterator[OidcProvider]:
    try:
        provider = OidcProvider.start(n_clients=1, n_always_refresh=0, extra_clients=tuple(clients.values()))
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
    yield
    leakcheck.add_secret(*oidc.secrets())


async def _broker(
    make_broker: BrokerFactory,
    oidc: OidcProvider,
    client: OidcClient,
    key: ClientKey,
    tmp_path: Path,
    **auth: Any,
) -> Broker:
    ab: dict[str, Any] = {
        "mode": "oauth_connect",
        "issuer": oidc.issuer,
        "client_id": client.client_id,
        "token_endpoint_auth_method": "private_key_jwt",
        "private_key_file": str(key.write(tmp_path / "client.pem")),
        "key_id": key.kid,
        "redirect_uri": client.redirect_uri,
        "scopes": SCOPES,
        # Pushed with the rest: OpenID Connect Core section 11 wants it for offline_access.
        "authorization_params": {"prompt": "consent"},
        # This client must push (a per-client rule, which the provider's metadata cannot say).
        "pushed_authorization_requests": True,
        **auth,
    }
    return await make_broker(
        upstreams=[{"name": UPSTREAM, "url": "https://api.oidc.test", "auth_broker": ab}]
    )


def _introspect(oidc: OidcProvider, token: str) -> dict[str, Any]:
    return oidc.introspect(oidc.client(), token)


async def _connect(broker: Broker, oidc: OidcProvider, user: str) -> pb.CompleteResponse:
    started = await broker.start_flow(user, UPSTREAM)
    query = parse_qs(urlsplit(started.authorization_url).query)
    assert set(query) == {"client_id", "request_uri"}  # pushed: the URL carries only the reference
    assert query["request_uri"][0].startswith("urn:ietf:params:oauth:request_uri:")
    callback = await asyncio.to_thread(oidc.authorize, started.authorization_url, user)
    assert callback.get("state") == started.state, callback.get("error")
    return await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user, iss=callback["iss"])
    )


def _refresh_token(broker: Broker, user: str) -> str:
    found = broker.app.vault.get(user, broker.app.config.upstreams[0].key)
    assert found is not None and found[0].secrets.refresh_token
    token = found[0].secrets.refresh_token
    leakcheck.add_secret(token)
    return token


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_private_key_jwt_and_par_connect_refresh_and_revoke(
    make_broker: BrokerFactory,
    oidc: OidcProvider,
    clients: dict[str, OidcClient],
    keys: dict[str, ClientKey],
    tmp_path: Path,
    alg: str,
) -> None:
    client = clients[alg]
    broker = await _broker(make_broker, oidc, client, keys[alg], tmp_path)
    auth = broker.app.config.upstreams[0].auth_broker
    # The provider's metadata names its PAR endpoint (discovery fills it in).
    assert auth.pushed_authorization_request_endpoint == oidc.issuer + "/request"
    user = f"pkjwt-{alg}"
    completed = await _connect(broker, oidc, user)
    assert "offline_access" in completed.credential.scopes

    first = await broker.resolve(user, UPSTREAM)
    leakcheck.add_secret(first.access_token)
    seen = _introspect(oidc, first.access_token)
    assert seen["active"] is True and seen["client_id"] == client.client_id and seen["sub"] == user

    old_refresh = _refresh_token(broker, user)
    await broker.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM))
    new_refresh = _refresh_token(broker, user)
    assert new_refresh != old_refresh  # rotated; a second assertion (a new jti) was accepted
    second = await broker.resolve(user, UPSTREAM)
    leakcheck.add_secret(second.access_token)
    assert second.access_token != first.access_token
    assert _introspect(oidc, second.access_token)["active"] is True

    done = await broker.stub.Disconnect(pb.DisconnectRequest(user_id=user, upstream=UPSTREAM))
    assert [(r.token_type_hint, r.outcome) for r in done.revocations] == [
        ("refresh_token", "revoked"),
        ("access_token", "revoked"),
    ]
    assert _introspect(oidc, new_refresh)["active"] is False
    assert _introspect(oidc, second.access_token)["active"] is False


async def test_an_unpushed_request_is_refused_by_the_provider(
    make_broker: BrokerFactory,
    oidc: OidcProvider,
    clients: dict[str, OidcClient],
    keys: dict[str, ClientKey],
    tmp_path: Path,
) -> None:
    """The control: the same client with PAR turned off gets the provider's refusal, so the
    test above shows the broker pushing, not a provider that does not care."""
    broker = await _broker(
        make_broker, oidc, clients["RS256"], keys["RS256"], tmp_path, pushed_authorization_requests=False
    )
    started = await broker.start_flow("no-par", UPSTREAM)
    assert "request_uri" not in started.authorization_url
    callback = await asyncio.to_thread(oidc.authorize, started.authorization_url, "no-par")
    assert "code" not in callback
    assert callback["error"] == "invalid_request"


async def test_a_key_the_provider_does_not_know_is_invalid_client(
    make_broker: BrokerFactory, oidc: OidcProvider, clients: dict[str, OidcClient], tmp_path: Path
) -> None:
    """Signed with another key: the push itself is refused (HTTP 401 invalid_client)."""
    import grpc

    from tests.conftest import error_info

    broker = await _broker(make_broker, oidc, clients["RS256"], ClientKey.generate("RS256"), tmp_path)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.start_flow("wrong-key", UPSTREAM)
    assert error_info(info.value).reason == "TOKEN_REQUEST_REJECTED"
    assert error_info(info.value).metadata["oauth_error"] == "invalid_client"
    assert broker.query("SELECT COUNT(*) FROM pending_flows") == [(0,)]
