"""Microsoft Entra without a client secret: private_key_jwt (RFC 7523 section 2.2) and workload
identity federation (``client_assertion_file``), through the real gRPC server with
``provider: microsoft`` and only the endpoints pointed at the Entra emulator, which verifies each
assertion's signature with the public key this test generated at run time.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests import leakcheck
from tests.client_keys import ClientKey, service_account_token, thumbprint_s256
from tests.conftest import REDIRECT_URI, Broker, BrokerFactory, error_info
from tests.providers.emulator import CLIENT_ID
from tests.providers.microsoft import FEDERATED_AUDIENCE, TENANT, Microsoft, MicrosoftTenant

K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
K8S_SUBJECT = "system:serviceaccount:apps:credential-broker"


@pytest.fixture
def entra() -> Iterator[Microsoft]:
    server = Microsoft(accept_secret=False).start()
    try:
        yield server
    finally:
        server.stop()


async def _broker(make_broker: BrokerFactory, entra: Microsoft, **auth: Any) -> Broker:
    doc = {
        "provider": "microsoft",
        "client_id": CLIENT_ID,
        "token_endpoint_auth_method": "private_key_jwt",
        "redirect_uri": REDIRECT_URI,
        **entra.endpoints(),
        **auth,
    }
    return await make_broker(
        upstreams=[{"name": "up", "url": "https://graph.microsoft.com", "auth_broker": doc}]
    )


async def _connect(broker: Broker, entra: Microsoft, user: str = "alice") -> pb.CompleteResponse:
    started = await broker.start_flow(user, "up")
    callback = await asyncio.to_thread(entra.authorize, started.authorization_url, user)
    return await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user)
    )


def _form(entra: Microsoft, index: int) -> dict[str, str]:
    return entra.token_requests()[index].form()


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_private_key_jwt_connect_resolve_refresh_with_rotating_refresh_tokens(
    make_broker: BrokerFactory, entra: Microsoft, tmp_path: Path, alg: str
) -> None:
    key = ClientKey.generate(alg)
    entra.client_keys.append(key.public)
    broker = await _broker(
        make_broker, entra, private_key_file=str(key.write(tmp_path / "client.pem")), key_id=key.kid
    )
    completed = await _connect(broker, entra)
    assert "offline_access" in entra.authorization_requests()[-1].query["scope"].split()
    first = await broker.resolve("alice", "up")
    assert first.access_token in entra.minted

    # Expired: Resolve refreshes with a new assertion; the rotated refresh token is stored.
    broker.clock.advance(completed.credential.expires_at.seconds - broker.clock.now() + 1)
    second = await broker.resolve("alice", "up")
    assert second.access_token != first.access_token and second.access_token in entra.minted
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))

    forms = [_form(entra, i) for i in range(len(entra.token_requests()))]
    assert [f["grant_type"] for f in forms] == ["authorization_code", "refresh_token", "refresh_token"]
    presented = [f["refresh_token"] for f in forms[1:]]
    assert len(set(presented)) == 2  # each rotated refresh token used once
    for form in forms:
        assert "client_secret" not in form and form["client_id"] == CLIENT_ID
    assert len(entra.assertions) == 3
    jtis = set()
    for header, claims in entra.assertions:
        assert header["alg"] == alg and header["kid"] == key.kid
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["aud"] == entra.base + entra.token_path
        assert 0 < claims["exp"] - claims["iat"] <= 300
        assert abs(claims["iat"] - time.time()) < 60
        jtis.add(claims["jti"])
    assert len(jtis) == 3  # a fresh jti each time

    # The old refresh token was revoked when it was used.
    with entra.lock:
        assert presented[0] not in entra.grants


async def test_private_key_jwt_signed_with_an_unregistered_key_is_invalid_client(
    make_broker: BrokerFactory, entra: Microsoft, tmp_path: Path
) -> None:
    entra.client_keys.append(ClientKey.generate().public)  # the app trusts another key
    key = ClientKey.generate()
    broker = await _broker(make_broker, entra, private_key_file=str(key.write(tmp_path / "k.pem")))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _connect(broker, entra)
    assert error_info(info.value).reason == "TOKEN_REQUEST_REJECTED"
    assert error_info(info.value).metadata["oauth_error"] == "invalid_client"
    assert broker.query("SELECT COUNT(*) FROM credentials") == [(0,)]


async def test_client_assertion_file_is_reread_on_every_request(
    make_broker: BrokerFactory, entra: Microsoft, tmp_path: Path
) -> None:
    """Workload identity federation: a projected service account token, rotated by the kubelet."""
    cluster = ClientKey.generate()
    entra.federated.append((K8S_ISSUER, K8S_SUBJECT, cluster.public))
    token_file = tmp_path / "azure-identity-token"

    def rotate() -> str:
        token = service_account_token(
            cluster, issuer=K8S_ISSUER, subject=K8S_SUBJECT, audience=FEDERATED_AUDIENCE
        )
        token_file.write_text(token + "\n")
        return token

    first = rotate()
    broker = await _broker(make_broker, entra, client_assertion_file=str(token_file))
    await _connect(broker, entra)
    assert _form(entra, 0)["client_assertion"] == first

    second = rotate()
    assert second != first
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
    assert _form(entra, 1)["client_assertion"] == second
    assert "client_secret" not in _form(entra, 1)
    assert [claims["iss"] for _, claims in entra.assertions] == [K8S_ISSUER, K8S_ISSUER]
    assert (await broker.resolve("alice", "up")).access_token in entra.minted


@pytest.mark.parametrize("state", ["empty", "missing", "not-a-jwt"])
async def test_a_missing_or_empty_assertion_file_is_a_clear_error_and_the_server_keeps_serving(
    make_broker: BrokerFactory, entra: Microsoft, tmp_path: Path, state: str
) -> None:
    cluster = ClientKey.generate()
    entra.federated.append((K8S_ISSUER, K8S_SUBJECT, cluster.public))
    token_file = tmp_path / "token"
    token_file.write_text(
        service_account_token(cluster, issuer=K8S_ISSUER, subject=K8S_SUBJECT, audience=FEDERATED_AUDIENCE)
    )
    broker = await _broker(make_broker, entra, client_assertion_file=str(token_file))
    await _connect(broker, entra)
    before = len(entra.token_requests())

    if state == "empty":
        token_file.write_text("")
    elif state == "missing":
        token_file.unlink()
    else:
        token_file.write_text("secret-looking-content that is not a JWT")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(info.value).reason == "CLIENT_ASSERTION_UNAVAILABLE"
    assert "client_assertion_file" in info.value.details()
    assert "secret-looking" not in info.value.details()
    assert len(entra.token_requests()) == before  # nothing was sent
    # The server keeps serving: the still-valid token resolves, and the connection is kept.
    assert (await broker.resolve("alice", "up")).access_token in entra.minted
    listed = await broker.stub.ListConnections(pb.ListConnectionsRequest(user_id="alice"))
    assert [c.status for c in listed.connections] == ["unavailable"]


async def test_a_certificate_credential_is_found_by_its_thumbprint(
    make_broker: BrokerFactory, entra: Microsoft, tmp_path: Path
) -> None:
    """Entra finds a certificate credential by the x5t#S256 (or x5t) thumbprint in the JWT
    header: with certificate_file the broker sends both, and the app's certificate is found."""
    key = ClientKey.generate()
    certificate = key.certificate(tmp_path / "client.crt")
    entra.client_certs.append(certificate)
    broker = await _broker(
        make_broker,
        entra,
        private_key_file=str(key.write(tmp_path / "client.pem")),
        certificate_file=str(tmp_path / "client.crt"),
    )
    await _connect(broker, entra)
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
    assert len(entra.assertions) == 2
    for header, _ in entra.assertions:
        assert header["x5t#S256"] == thumbprint_s256(certificate)
        assert header["x5t"]


async def test_without_the_certificate_entra_cannot_find_the_key(
    make_broker: BrokerFactory, entra: Microsoft, tmp_path: Path
) -> None:
    """The control for the test above: the same key, no thumbprint, no credential found."""
    key = ClientKey.generate()
    entra.client_certs.append(key.certificate())
    broker = await _broker(make_broker, entra, private_key_file=str(key.write(tmp_path / "client.pem")))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _connect(broker, entra)
    assert error_info(info.value).metadata["oauth_error"] == "invalid_client"


@pytest.mark.parametrize("credential", ["private_key_file", "client_assertion_file"])
async def test_on_behalf_of_authenticates_the_client_with_an_assertion(
    make_broker: BrokerFactory, entra: Microsoft, tmp_path: Path, credential: str
) -> None:
    """mode entra_obo: the on-behalf-of request authenticates the client the same way."""
    if credential == "private_key_file":
        key = ClientKey.generate()
        entra.client_keys.append(key.public)
        auth = {"private_key_file": str(key.write(tmp_path / "client.pem"))}
    else:
        cluster = ClientKey.generate()
        entra.federated.append((K8S_ISSUER, K8S_SUBJECT, cluster.public))
        token_file = tmp_path / "token"
        token_file.write_text(
            service_account_token(
                cluster, issuer=K8S_ISSUER, subject=K8S_SUBJECT, audience=FEDERATED_AUDIENCE
            )
        )
        auth = {"client_assertion_file": str(token_file)}
    doc = {
        "mode": "entra_obo",
        "token_endpoint": entra.base + entra.token_path,
        "client_id": CLIENT_ID,
        "token_endpoint_auth_method": "private_key_jwt",
        "scopes": ["https://graph.microsoft.com/.default"],
        **auth,
    }
    broker = await make_broker(
        upstreams=[{"name": "up", "url": "https://graph.microsoft.com", "auth_broker": doc}]
    )
    user_token = "user-token-" + secrets.token_urlsafe(12)
    leakcheck.add_secret(user_token)
    answer = await broker.resolve("alice", "up", subject_token=user_token)
    assert answer.access_token in entra.minted
    form = entra.token_requests()[-1].form()
    assert form["requested_token_use"] == "on_behalf_of" and form["assertion"] == user_token
    assert "client_secret" not in form and len(entra.assertions) == 1


async def test_with_a_tenant_connection_param_the_assertion_audience_is_the_tenants_token_endpoint(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """``microsoft-tenant``: the token endpoint is a template; the assertion's ``aud`` is the
    endpoint filled with the connection's tenant, on the code grant and on refresh."""
    entra = MicrosoftTenant(accept_secret=False).start()
    try:
        key = ClientKey.generate()
        entra.client_keys.append(key.public)
        doc = {
            "provider": "microsoft-tenant",
            "client_id": CLIENT_ID,
            "token_endpoint_auth_method": "private_key_jwt",
            "private_key_file": str(key.write(tmp_path / "client.pem")),
            "redirect_uri": REDIRECT_URI,
            **entra.endpoints(),
        }
        broker = await make_broker(
            upstreams=[{"name": "up", "url": "https://graph.microsoft.com", "auth_broker": doc}]
        )
        started = await broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(
                user_id="alice", upstream="up", connection_params=entra.connection_params
            )
        )
        callback = await asyncio.to_thread(entra.authorize, started.authorization_url, "alice")
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
        )
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
        assert [claims["aud"] for _, claims in entra.assertions] == [entra.base + entra.token_path] * 2
        assert TENANT in entra.token_path
    finally:
        entra.stop()
