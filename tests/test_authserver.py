"""Tests of the loopback authorization server itself, over real HTTP with httpx."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlencode, urlsplit

import httpx
import pytest

from tests.authserver import (
    FAILURE_KINDS,
    GRANT_JWT_BEARER,
    GRANT_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
    AuthorizeError,
    AuthServer,
    Client,
)

pytestmark = pytest.mark.timeout(30)

ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


# --------------------------------------------------------------------------- helpers


def pkce_pair() -> tuple[str, str]:
    """A fresh (code_verifier, S256 code_challenge) pair per RFC 7636 §4.1/§4.2."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def basic_header(client_id: str, client_secret: str) -> str:
    """HTTP Basic client credentials, form-urlencoded first as RFC 6749 §2.3.1 requires."""
    raw = f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def auth_url(server: AuthServer, client: Client, challenge: str, **extra: str) -> str:
    """An authorization request URL (RFC 6749 §4.1.1 + RFC 7636 §4.3)."""
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uris[0],
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": secrets.token_urlsafe(8),
        "scope": "read write",
    }
    params.update(extra)
    return server.authorization_endpoint + "?" + urlencode(params)


def post_token(
    http: httpx.Client,
    server: AuthServer,
    client: Client,
    data: dict[str, Any],
    *,
    method: str | None = None,
    endpoint: str | None = None,
) -> httpx.Response:
    """POST a form to /token (or ``endpoint``) authenticating with ``method`` (default: the
    client's own registered method)."""
    method = method or client.auth_method
    form = dict(data)
    headers: dict[str, str] = {}
    if method == "client_secret_basic":
        headers["Authorization"] = basic_header(client.client_id, client.client_secret or "")
    elif method == "client_secret_post":
        form["client_id"] = client.client_id
        form["client_secret"] = client.client_secret or ""
    else:
        form["client_id"] = client.client_id
    return http.post(endpoint or server.token_endpoint, data=form, headers=headers)


def get_code(server: AuthServer, client: Client, user: str = "alice", **extra: str) -> tuple[str, str]:
    """Run the authorization step; return (code, code_verifier)."""
    verifier, challenge = pkce_pair()
    result = server.authorize(auth_url(server, client, challenge, **extra), user=user)
    return result["code"], verifier


def code_grant(
    http: httpx.Client, server: AuthServer, client: Client, user: str = "alice", **extra: str
) -> dict[str, Any]:
    """Full authorization-code flow; return the successful token response."""
    code, verifier = get_code(server, client, user)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "redirect_uri": client.redirect_uris[0],
        **extra,
    }
    response = post_token(http, server, client, data)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def refresh(
    http: httpx.Client, server: AuthServer, client: Client, token: str, **extra: str
) -> httpx.Response:
    """A refresh_token grant request."""
    return post_token(http, server, client, {"grant_type": "refresh_token", "refresh_token": token, **extra})


def assert_oauth_error(response: httpx.Response, status: int, error: str) -> None:
    """An RFC 6749 §5.2 error response."""
    assert response.status_code == status, response.text
    assert response.json()["error"] == error


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def server() -> Iterator[AuthServer]:
    """A started server, stopped afterwards."""
    with AuthServer() as srv:
        yield srv


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain httpx client that does not follow redirects."""
    with httpx.Client(timeout=10, follow_redirects=False) as client:
        yield client


@pytest.fixture
def client(server: AuthServer) -> Client:
    """A confidential client using client_secret_basic."""
    return server.new_client()


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"]
)
def test_metadata_document(server: AuthServer, http: httpx.Client, path: str) -> None:
    response = http.get(server.base_url + path)
    assert response.status_code == 200
    meta = response.json()
    assert meta["issuer"] == server.issuer == server.base_url
    assert meta["authorization_endpoint"] == server.authorization_endpoint
    assert meta["token_endpoint"] == server.token_endpoint
    assert meta["revocation_endpoint"] == server.revocation_endpoint
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["response_types_supported"] == ["code"]
    assert set(meta["grant_types_supported"]) == {
        "authorization_code",
        "refresh_token",
        GRANT_TOKEN_EXCHANGE,
        GRANT_JWT_BEARER,
    }
    assert set(meta["token_endpoint_auth_methods_supported"]) == {
        "client_secret_basic",
        "client_secret_post",
        "none",
    }
    assert meta["authorization_response_iss_parameter_supported"] is True


def test_endpoints_are_on_loopback(server: AuthServer) -> None:
    assert server.base_url.startswith("http://127.0.0.1:")
    assert server.authorization_endpoint == server.base_url + "/authorize"
    assert server.token_endpoint == server.base_url + "/token"
    assert server.revocation_endpoint == server.base_url + "/revoke"


def test_unknown_path_and_wrong_method(server: AuthServer, http: httpx.Client) -> None:
    assert http.get(server.base_url + "/nope").status_code == 404
    assert http.get(server.token_endpoint).status_code == 405
    assert http.post(server.authorization_endpoint).status_code == 405


def test_base_url_needs_start() -> None:
    with pytest.raises(RuntimeError):
        _ = AuthServer().base_url


# --------------------------------------------------------------------------- /authorize


def test_authorize_returns_code_state_and_iss(server: AuthServer, client: Client) -> None:
    _, challenge = pkce_pair()
    result = server.authorize(auth_url(server, client, challenge, state="xyz"), user="bob")
    assert set(result) == {"code", "state", "iss"}
    assert result["state"] == "xyz"
    assert result["iss"] == server.issuer  # RFC 9207
    assert result["code"] in server.issued
    recorded = server.requests[-1]
    assert recorded.method == "GET" and recorded.path == "/authorize"
    assert recorded.query["client_id"] == [client.client_id]


def test_authorize_deny(server: AuthServer, client: Client) -> None:
    _, challenge = pkce_pair()
    result = server.authorize(auth_url(server, client, challenge, state="s1"), deny=True)
    assert result == {"error": "access_denied", "state": "s1", "iss": server.issuer}


def test_authorize_redirect_keeps_redirect_uri_query(server: AuthServer) -> None:
    client = server.new_client(redirect_uri="http://127.0.0.1:9/cb?tenant=x")
    _, challenge = pkce_pair()
    url = auth_url(server, client, challenge)
    result = server.authorize(url)
    assert result["tenant"] == "x" and "code" in result


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"client_id": "unknown-client"}, "invalid_request"),
        ({"redirect_uri": "http://127.0.0.1/evil"}, "invalid_request"),
    ],
)
def test_authorize_rejects_bad_requests(
    server: AuthServer, client: Client, override: dict[str, str | None], error: str
) -> None:
    _, challenge = pkce_pair()
    params = dict(parse_qs(urlsplit(auth_url(server, client, challenge)).query))
    flat: dict[str, str] = {k: v[0] for k, v in params.items()}
    for name, value in override.items():
        if value is None:
            flat.pop(name)
        else:
            flat[name] = value
    with pytest.raises(AuthorizeError) as info:
        server.authorize(server.authorization_endpoint + "?" + urlencode(flat))
    assert info.value.status == 400
    assert error in info.value.body


# --------------------------------------------------------------------------- authorization code


def test_code_flow_with_pkce(server: AuthServer, http: httpx.Client, client: Client) -> None:
    code, verifier = get_code(server, client, user="bob")
    response = post_token(
        http,
        server,
        client,
        {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": client.redirect_uris[0],
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"  # RFC 6749 §5.1
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "read write"
    assert body["access_token"].startswith("at_")
    assert body["refresh_token"].startswith("rt_")
    info = server.access_token_info(body["access_token"])
    assert info is not None
    assert info["user"] == "bob"
    assert info["client_id"] == client.client_id
    assert info["scope"] == "read write"
    assert info["expires_at"] == pytest.approx(time.time() + 3600, abs=60)
    issued = server.issued
    for secret in (code, verifier, body["access_token"], body["refresh_token"]):
        assert secret in issued
    assert client.client_secret in issued
    assert server.access_token_info("at_unknown") is None


def test_code_flow_without_ttl_or_refresh(http: httpx.Client) -> None:
    with AuthServer(access_ttl=None, issue_refresh_token=False) as server:
        client = server.new_client()
        body = code_grant(http, server, client)
        assert "expires_in" not in body
        assert "refresh_token" not in body
        info = server.access_token_info(body["access_token"])
        assert info is not None and info["expires_at"] is None


def test_code_flow_without_scope_omits_scope(server: AuthServer, http: httpx.Client, client: Client) -> None:
    verifier, challenge = pkce_pair()
    url = auth_url(server, client, challenge)
    url = url.replace("&scope=read+write", "")
    code = server.authorize(url)["code"]
    response = post_token(
        http,
        server,
        client,
        {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": client.redirect_uris[0],
        },
    )
    assert response.status_code == 200
    assert "scope" not in response.json()


def _code_request(client: Client, code: str, verifier: str | None) -> dict[str, str]:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": client.redirect_uris[0],
    }
    if verifier is not None:
        data["code_verifier"] = verifier
    return data


def test_wrong_verifier_rejected(server: AuthServer, http: httpx.Client, client: Client) -> None:
    code, _ = get_code(server, client)
    other_verifier, _ = pkce_pair()
    response = post_token(http, server, client, _code_request(client, code, other_verifier))
    assert_oauth_error(response, 400, "invalid_grant")


def test_missing_verifier_rejected(server: AuthServer, http: httpx.Client, client: Client) -> None:
    code, _ = get_code(server, client)
    response = post_token(http, server, client, _code_request(client, code, None))
    assert_oauth_error(response, 400, "invalid_grant")


def test_code_reuse_rejected_and_grant_revoked(
    server: AuthServer, http: httpx.Client, client: Client
) -> None:
    code, verifier = get_code(server, client)
    first = post_token(http, server, client, _code_request(client, code, verifier))
    assert first.status_code == 200
    second = post_token(http, server, client, _code_request(client, code, verifier))
    assert_oauth_error(second, 400, "invalid_grant")
    # RFC 6749 §4.1.2: tokens issued from a reused code are revoked.
    assert server.access_token_info(first.json()["access_token"]) is None
    assert not server.refresh_token_live(first.json()["refresh_token"])


def test_code_is_bound_to_client(server: AuthServer, http: httpx.Client, client: Client) -> None:
    other = server.new_client()
    code, verifier = get_code(server, client)
    response = post_token(http, server, other, _code_request(client, code, verifier))
    assert_oauth_error(response, 400, "invalid_grant")


def test_code_is_bound_to_redirect_uri(server: AuthServer, http: httpx.Client, client: Client) -> None:
    code, verifier = get_code(server, client)
    data = _code_request(client, code, verifier)
    data["redirect_uri"] = "http://127.0.0.1/other"
    assert_oauth_error(post_token(http, server, client, data), 400, "invalid_grant")


def test_expired_code_rejected(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.code_ttl = 0
    code, verifier = get_code(server, client)
    response = post_token(http, server, client, _code_request(client, code, verifier))
    assert_oauth_error(response, 400, "invalid_grant")


def test_code_bound_to_resource(server: AuthServer, http: httpx.Client, client: Client) -> None:
    api = "https://api.example.test/"
    code, verifier = get_code(server, client, resource=api)
    data = _code_request(client, code, verifier)
    data["resource"] = "https://other.example.test/"
    assert_oauth_error(post_token(http, server, client, data), 400, "invalid_target")

    code, verifier = get_code(server, client, resource=api)
    data = _code_request(client, code, verifier)
    data["resource"] = api
    response = post_token(http, server, client, data)
    assert response.status_code == 200
    info = server.access_token_info(response.json()["access_token"])
    assert info is not None and info["resource"] == [api]


# --------------------------------------------------------------------------- client authentication


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "none"])
def test_each_auth_method_accepted(server: AuthServer, http: httpx.Client, method: str) -> None:
    client = server.new_client(auth_method=method)
    assert (client.client_secret is None) == (method == "none")
    body = code_grant(http, server, client)
    assert server.access_token_info(body["access_token"]) is not None
    recorded = server.token_requests("authorization_code")[-1]
    if method == "client_secret_basic":
        assert recorded.headers["authorization"].startswith("Basic ")
        assert "client_secret" not in recorded.form
    elif method == "client_secret_post":
        assert recorded.form["client_secret"] == [client.client_secret]
    else:
        assert "authorization" not in recorded.headers
        assert recorded.form["client_id"] == [client.client_id]


@pytest.mark.parametrize(
    ("registered", "used"),
    [
        ("client_secret_basic", "client_secret_post"),
        ("client_secret_basic", "none"),
        ("client_secret_post", "client_secret_basic"),
        ("client_secret_post", "none"),
        ("none", "client_secret_basic"),
        ("none", "client_secret_post"),
    ],
)
def test_wrong_auth_method_rejected(
    server: AuthServer, http: httpx.Client, registered: str, used: str
) -> None:
    client = server.new_client(auth_method=registered)
    code, verifier = get_code(server, client)
    if client.client_secret is None:
        # A public client presenting some secret is still the wrong method.
        client = Client(client.client_id, secrets.token_urlsafe(16), registered)
    response = post_token(http, server, client, _code_request(client, code, verifier), method=used)
    assert_oauth_error(response, 401, "invalid_client")
    assert response.headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_wrong_secret_rejected(server: AuthServer, http: httpx.Client, method: str) -> None:
    client = server.new_client(auth_method=method)
    impostor = Client(client.client_id, secrets.token_urlsafe(32), method)
    response = post_token(http, server, impostor, {"grant_type": "refresh_token"})
    assert_oauth_error(response, 401, "invalid_client")


def test_unknown_client_rejected(server: AuthServer, http: httpx.Client) -> None:
    stranger = Client("stranger-" + secrets.token_urlsafe(4), secrets.token_urlsafe(16))
    response = post_token(http, server, stranger, {"grant_type": "refresh_token"})
    assert_oauth_error(response, 401, "invalid_client")


def test_basic_credentials_are_form_urlencoded(server: AuthServer, http: httpx.Client) -> None:
    # RFC 6749 §2.3.1: id and secret are form-urlencoded inside the Basic header.
    secret = secrets.token_urlsafe(16) + ":+/% &="
    client = server.add_client(Client("id:" + secrets.token_urlsafe(4), secret))
    ok = post_token(http, server, client, {"grant_type": "unknown"})
    assert_oauth_error(ok, 400, "unsupported_grant_type")  # authenticated, then grant checked
    raw = base64.b64encode(f"{client.client_id}:{secret}".encode()).decode()
    naive = http.post(
        server.token_endpoint,
        data={"grant_type": "unknown"},
        headers={"Authorization": "Basic " + raw},
    )
    assert_oauth_error(naive, 401, "invalid_client")


def test_two_auth_methods_at_once_rejected(server: AuthServer, http: httpx.Client, client: Client) -> None:
    assert client.client_secret is not None
    response = http.post(
        server.token_endpoint,
        data={"grant_type": "unknown", "client_secret": client.client_secret},
        headers={"Authorization": basic_header(client.client_id, client.client_secret)},
    )
    assert_oauth_error(response, 400, "invalid_request")


def test_token_request_must_be_form_encoded(server: AuthServer, http: httpx.Client, client: Client) -> None:
    assert client.client_secret is not None
    response = http.post(
        server.token_endpoint,
        json={"grant_type": "refresh_token"},
        headers={"Authorization": basic_header(client.client_id, client.client_secret)},
    )
    assert_oauth_error(response, 400, "invalid_request")


def test_repeated_parameter_rejected(server: AuthServer, http: httpx.Client) -> None:
    client = server.new_client(auth_method="none")
    response = http.post(
        server.token_endpoint,
        content=urlencode(
            [("grant_type", "refresh_token"), ("grant_type", "x"), ("client_id", client.client_id)]
        ),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_oauth_error(response, 400, "invalid_request")


def test_unsupported_grant_type(server: AuthServer, http: httpx.Client, client: Client) -> None:
    response = post_token(http, server, client, {"grant_type": "password"})
    assert_oauth_error(response, 400, "unsupported_grant_type")


# --------------------------------------------------------------------------- refresh


def test_refresh_rotation(server: AuthServer, http: httpx.Client, client: Client) -> None:
    first = code_grant(http, server, client, user="carol")
    response = refresh(http, server, client, first["refresh_token"])
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["token_type"] == "Bearer" and second["expires_in"] == 3600
    assert not server.refresh_token_live(first["refresh_token"])
    assert server.refresh_token_live(second["refresh_token"])
    info = server.access_token_info(second["access_token"])
    assert info is not None and info["user"] == "carol"
    first_info = server.access_token_info(first["access_token"])
    assert first_info is not None and info["grant"] == first_info["grant"]
    third = refresh(http, server, client, second["refresh_token"])
    assert third.status_code == 200


def test_refresh_reuse_revokes_grant(server: AuthServer, http: httpx.Client, client: Client) -> None:
    first = code_grant(http, server, client)
    second = refresh(http, server, client, first["refresh_token"]).json()
    reuse = refresh(http, server, client, first["refresh_token"])
    assert_oauth_error(reuse, 400, "invalid_grant")
    # RFC 9700 §4.14.2: the whole grant is gone, including the legitimately rotated tokens.
    assert_oauth_error(refresh(http, server, client, second["refresh_token"]), 400, "invalid_grant")
    assert server.access_token_info(first["access_token"]) is None
    assert server.access_token_info(second["access_token"]) is None


def test_refresh_reuse_without_grant_revocation(http: httpx.Client) -> None:
    with AuthServer(revoke_grant_on_reuse=False) as server:
        client = server.new_client()
        first = code_grant(http, server, client)
        second = refresh(http, server, client, first["refresh_token"]).json()
        reuse = refresh(http, server, client, first["refresh_token"])
        assert_oauth_error(reuse, 400, "invalid_grant")
        assert refresh(http, server, client, second["refresh_token"]).status_code == 200


def test_refresh_without_rotation(http: httpx.Client) -> None:
    with AuthServer(rotate_refresh_tokens=False) as server:
        client = server.new_client()
        first = code_grant(http, server, client)
        for _ in range(3):
            response = refresh(http, server, client, first["refresh_token"])
            assert response.status_code == 200
            assert "refresh_token" not in response.json()
        assert server.refresh_token_live(first["refresh_token"])


def test_refresh_scope_and_resource(server: AuthServer, http: httpx.Client, client: Client) -> None:
    first = code_grant(http, server, client)
    narrowed = refresh(http, server, client, first["refresh_token"], scope="read")
    assert narrowed.status_code == 200
    assert narrowed.json()["scope"] == "read"
    info = server.access_token_info(narrowed.json()["access_token"])
    assert info is not None and info["scope"] == "read"
    recorded = server.token_requests("refresh_token")[-1]
    assert recorded.form["scope"] == ["read"]
    widened = refresh(http, server, client, narrowed.json()["refresh_token"], scope="read admin")
    assert_oauth_error(widened, 400, "invalid_scope")
    with_resource = refresh(
        http, server, client, narrowed.json()["refresh_token"], resource="https://r.test/"
    )
    assert with_resource.status_code == 200
    assert server.token_requests("refresh_token")[-1].form["resource"] == ["https://r.test/"]


def test_refresh_token_bound_to_client(server: AuthServer, http: httpx.Client, client: Client) -> None:
    first = code_grant(http, server, client)
    other = server.new_client()
    assert_oauth_error(refresh(http, server, other, first["refresh_token"]), 400, "invalid_grant")


def test_unknown_refresh_token(server: AuthServer, http: httpx.Client, client: Client) -> None:
    response = refresh(http, server, client, "rt_" + secrets.token_urlsafe(8))
    assert_oauth_error(response, 400, "invalid_grant")


def test_revoke_user(server: AuthServer, http: httpx.Client, client: Client) -> None:
    alice = code_grant(http, server, client, user="alice")
    bob = code_grant(http, server, client, user="bob")
    server.revoke_user("alice")
    assert_oauth_error(refresh(http, server, client, alice["refresh_token"]), 400, "invalid_grant")
    assert refresh(http, server, client, bob["refresh_token"]).status_code == 200


def test_concurrent_refresh_of_one_token_succeeds_once(server: AuthServer, client: Client) -> None:
    with httpx.Client(timeout=10) as setup:
        token = code_grant(setup, server, client)["refresh_token"]

    def attempt(_: int) -> int:
        with httpx.Client(timeout=10) as h:
            return refresh(h, server, client, token).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(attempt, range(8)))
    assert statuses.count(200) == 1
    assert statuses.count(400) == 7


# --------------------------------------------------------------------------- token exchange


def test_token_exchange(server: AuthServer, http: httpx.Client, client: Client) -> None:
    subject = secrets.token_urlsafe(24)
    server.exchange_users[subject] = "dave"
    form = [
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", subject),
        ("subject_token_type", ID_TOKEN_TYPE),
        ("audience", "svc-a"),
        ("audience", "svc-b"),
        ("resource", "https://api.test/"),
        ("requested_token_type", JWT_TOKEN_TYPE),
        ("scope", "files.read"),
    ]
    assert client.client_secret is not None
    response = http.post(
        server.token_endpoint,
        content=urlencode(form),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Authorization": basic_header(client.client_id, client.client_secret),
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in", "scope"}
    assert body["issued_token_type"] == JWT_TOKEN_TYPE
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "files.read"
    info = server.access_token_info(body["access_token"])
    assert info is not None
    assert info["user"] == "dave"
    assert info["audience"] == ["svc-a", "svc-b"]
    assert info["resource"] == ["https://api.test/"]
    recorded = server.token_requests(GRANT_TOKEN_EXCHANGE)[-1]
    assert recorded.form["audience"] == ["svc-a", "svc-b"]
    assert subject in server.issued


def test_token_exchange_defaults_and_own_tokens(
    server: AuthServer, http: httpx.Client, client: Client
) -> None:
    mine = code_grant(http, server, client, user="erin")["access_token"]
    response = post_token(
        http,
        server,
        client,
        {
            "grant_type": GRANT_TOKEN_EXCHANGE,
            "subject_token": mine,
            "subject_token_type": TOKEN_TYPE_ACCESS_TOKEN,
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert body["issued_token_type"] == TOKEN_TYPE_ACCESS_TOKEN
    info = server.access_token_info(body["access_token"])
    assert info is not None and info["user"] == "erin"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"subject_token_type": ID_TOKEN_TYPE}, "invalid_request"),
        ({"subject_token": "known"}, "invalid_request"),
        ({"subject_token": "unknown", "subject_token_type": ID_TOKEN_TYPE}, "invalid_grant"),
        (
            {"subject_token": "known", "subject_token_type": ID_TOKEN_TYPE, "actor_token": "a"},
            "invalid_request",
        ),
    ],
)
def test_token_exchange_errors(
    server: AuthServer, http: httpx.Client, client: Client, data: dict[str, str], error: str
) -> None:
    known = secrets.token_urlsafe(16)
    server.exchange_users[known] = "frank"
    form = {k: (known if v == "known" else v) for k, v in data.items()}
    form["grant_type"] = GRANT_TOKEN_EXCHANGE
    assert_oauth_error(post_token(http, server, client, form), 400, error)


# --------------------------------------------------------------------------- Entra OBO


def _obo(assertion: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": GRANT_JWT_BEARER,
        "assertion": assertion,
        "requested_token_use": "on_behalf_of",
        "scope": "https://graph.microsoft.com/.default offline_access",
        **extra,
    }


def test_jwt_bearer_on_behalf_of(server: AuthServer, http: httpx.Client) -> None:
    client = server.new_client(auth_method="client_secret_post")
    assertion = secrets.token_urlsafe(32)
    server.exchange_users[assertion] = "grace"
    response = post_token(http, server, client, _obo(assertion))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "token_type",
        "scope",
        "expires_in",
        "ext_expires_in",
        "access_token",
        "refresh_token",
    }
    assert "issued_token_type" not in body
    assert body["scope"] == "https://graph.microsoft.com/.default offline_access"
    info = server.access_token_info(body["access_token"])
    assert info is not None and info["user"] == "grace"
    assert assertion in server.issued
    # The OBO refresh token works with the ordinary refresh grant.
    assert refresh(http, server, client, body["refresh_token"]).status_code == 200


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_obo("known", requested_token_use="bogus"), "invalid_request"),
        ({"grant_type": GRANT_JWT_BEARER, "assertion": "known"}, "invalid_request"),
        (_obo("unknown"), "invalid_grant"),
    ],
)
def test_jwt_bearer_errors(
    server: AuthServer, http: httpx.Client, client: Client, data: dict[str, str], error: str
) -> None:
    known = secrets.token_urlsafe(16)
    server.exchange_users[known] = "heidi"
    form = {k: (known if v == "known" else v) for k, v in data.items()}
    assert_oauth_error(post_token(http, server, client, form), 400, error)


# --------------------------------------------------------------------------- fail_next


def _exchange_form(server: AuthServer) -> dict[str, str]:
    subject = secrets.token_urlsafe(16)
    server.exchange_users[subject] = "ivan"
    return {
        "grant_type": GRANT_TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ID_TOKEN_TYPE,
    }


@pytest.mark.parametrize(
    ("kind", "status", "error"),
    [("500", 500, "server_error"), ("503", 503, "temporarily_unavailable")],
)
def test_fail_server_errors(
    server: AuthServer, http: httpx.Client, client: Client, kind: str, status: int, error: str
) -> None:
    server.fail_next(kind, count=2, retry_after=7)
    form = _exchange_form(server)
    for _ in range(2):
        response = post_token(http, server, client, form)
        assert_oauth_error(response, status, error)
        assert response.headers["retry-after"] == "7"
    assert post_token(http, server, client, form).status_code == 200
    assert [r.failure for r in server.token_requests()] == [kind, kind, None]


def test_failure_does_not_consume_code(server: AuthServer, http: httpx.Client, client: Client) -> None:
    code, verifier = get_code(server, client)
    server.fail_next("503")
    data = _code_request(client, code, verifier)
    assert post_token(http, server, client, data).status_code == 503
    assert post_token(http, server, client, data).status_code == 200


def test_failures_only_hit_token_endpoint(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("500")
    assert http.get(server.base_url + "/.well-known/oauth-authorization-server").status_code == 200
    _, challenge = pkce_pair()
    server.authorize(auth_url(server, client, challenge))
    revoke = post_token(http, server, client, {"token": "x"}, endpoint=server.revocation_endpoint)
    assert revoke.status_code == 200
    assert post_token(http, server, client, _exchange_form(server)).status_code == 500


def test_fail_timeout_delays_then_answers(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("timeout", seconds=0.5)
    start = time.monotonic()
    response = post_token(http, server, client, _exchange_form(server))
    assert time.monotonic() - start >= 0.5
    assert response.status_code == 200


def test_fail_timeout_trips_client_timeout(server: AuthServer, client: Client) -> None:
    server.fail_next("timeout", seconds=10)
    with httpx.Client(timeout=0.3) as h, pytest.raises(httpx.ReadTimeout):
        post_token(h, server, client, _exchange_form(server))


def test_fail_drip_sends_headers_at_once_then_one_byte_at_a_time(
    server: AuthServer, http: httpx.Client, client: Client
) -> None:
    server.fail_next("drip", seconds=0.004)
    start = time.monotonic()
    headers = {"Authorization": basic_header(client.client_id, client.client_secret or "")}
    form = _exchange_form(server)
    with http.stream("POST", server.token_endpoint, data=form, headers=headers) as response:
        headers_after = time.monotonic() - start
        chunks = list(response.iter_raw())
    elapsed = time.monotonic() - start
    body = b"".join(chunks)
    assert response.status_code == 200 and headers_after < 0.5
    assert len(chunks) > len(body) // 2  # the bytes came (mostly) one at a time
    assert elapsed >= len(body) * 0.004
    assert json.loads(body)["token_type"] == "Bearer"  # processed normally, then dripped


def test_fail_junk(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("junk")
    response = post_token(http, server, client, _exchange_form(server))
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_fail_huge(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("huge")
    response = post_token(http, server, client, _exchange_form(server))
    assert response.status_code == 200
    assert len(response.content) >= 2 * 1024 * 1024
    assert response.json()["token_type"] == "Bearer"


def test_fail_gzip_bomb(server: AuthServer, client: Client) -> None:
    server.fail_next("gzip_bomb")
    assert client.client_secret is not None
    with (
        httpx.Client(timeout=10) as h,
        h.stream(
            "POST",
            server.token_endpoint,
            data=_exchange_form(server),
            headers={"Authorization": basic_header(client.client_id, client.client_secret)},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        compressed = b"".join(response.iter_raw())
    assert len(compressed) < 1024 * 1024
    inflater = zlib.decompressobj(31)
    inflated = 0
    chunk = inflater.decompress(compressed, 1 << 20)
    while chunk:
        inflated += len(chunk)
        chunk = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
    assert inflated > 100 * 1024 * 1024


def test_fail_no_access_token(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("no_access_token")
    response = post_token(http, server, client, _exchange_form(server))
    assert response.status_code == 200
    assert "access_token" not in response.json()


def test_fail_wrong_types(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("wrong_types")
    body = post_token(http, server, client, _exchange_form(server)).json()
    assert isinstance(body["access_token"], int)
    assert isinstance(body["expires_in"], str)


@pytest.mark.parametrize(("kind", "expiry"), [("negative_expiry", -5), ("huge_expiry", 10**12)])
def test_fail_odd_expiry(
    server: AuthServer, http: httpx.Client, client: Client, kind: str, expiry: int
) -> None:
    server.fail_next(kind)
    body = code_grant(http, server, client)
    assert body["expires_in"] == expiry
    assert server.access_token_info(body["access_token"]) is not None
    assert server.refresh_token_live(body["refresh_token"])


def test_fail_no_refresh_token(server: AuthServer, http: httpx.Client, client: Client) -> None:
    first = code_grant(http, server, client)
    server.fail_next("no_refresh_token")
    response = refresh(http, server, client, first["refresh_token"])
    assert response.status_code == 200
    assert "refresh_token" not in response.json()
    # Nothing was rotated: the client's current refresh token keeps working.
    assert server.refresh_token_live(first["refresh_token"])
    assert refresh(http, server, client, first["refresh_token"]).status_code == 200


def test_fail_oauth_error_echoes_secrets(server: AuthServer, http: httpx.Client, client: Client) -> None:
    first = code_grant(http, server, client)
    server.fail_next("oauth_error")
    response = refresh(http, server, client, first["refresh_token"])
    assert_oauth_error(response, 400, "invalid_grant")
    description = response.json()["error_description"]
    assert first["refresh_token"] in description
    assert client.client_secret is not None and client.client_secret in description
    assert server.refresh_token_live(first["refresh_token"])  # state untouched


def test_fail_oauth_error_options(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("oauth_error", status=401, error="invalid_client", description="nope")
    response = post_token(http, server, client, _exchange_form(server))
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client", "error_description": "nope"}


def test_fail_oauth_error_echoes_code(server: AuthServer, http: httpx.Client, client: Client) -> None:
    code, verifier = get_code(server, client)
    server.fail_next("oauth_error")
    response = post_token(http, server, client, _code_request(client, code, verifier))
    assert code in response.json()["error_description"]


def test_fail_bad_error(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("bad_error")
    response = post_token(http, server, client, _exchange_form(server))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("<script>") and error.endswith("</script>")
    assert client.client_secret is not None and client.client_secret in error


def test_fail_close(server: AuthServer, http: httpx.Client, client: Client) -> None:
    server.fail_next("close")
    with pytest.raises(httpx.RemoteProtocolError):
        post_token(http, server, client, _exchange_form(server))
    assert post_token(http, server, client, _exchange_form(server)).status_code == 200


def test_fail_next_rejects_unknown_kind(server: AuthServer) -> None:
    with pytest.raises(ValueError):
        server.fail_next("teapot")
    with pytest.raises(ValueError):
        server.fail_next("500", count=0)


def test_every_failure_kind_is_covered() -> None:
    covered = {
        "500",
        "503",
        "timeout",
        "junk",
        "huge",
        "gzip_bomb",
        "no_access_token",
        "wrong_types",
        "negative_expiry",
        "huge_expiry",
        "no_refresh_token",
        "oauth_error",
        "bad_error",
        "close",
        "custom",
        "override",
        "drip",
    }
    assert covered == FAILURE_KINDS


def test_custom_failure_answers_exactly_what_was_given(
    server: AuthServer, http: httpx.Client, client: Client
) -> None:
    server.fail_next("custom", status=203, body=b"\x00not json", headers={"X-Test": "1"})
    answer = post_token(http, server, client, {"grant_type": "refresh_token", "refresh_token": "x"})
    assert (answer.status_code, answer.content, answer.headers["x-test"]) == (203, b"\x00not json", "1")


def test_override_failure_changes_fields_of_a_real_answer(
    server: AuthServer, http: httpx.Client, client: Client
) -> None:
    server.fail_next("override", fields={"token_type": "DPoP", "scope": None, "extra": [1]})
    body = code_grant(http, server, client)
    assert body["token_type"] == "DPoP" and body["extra"] == [1] and "scope" not in body
    assert server.access_token_info(body["access_token"]) is not None  # minted as usual


# --------------------------------------------------------------------------- revocation


def _revoke(
    http: httpx.Client, server: AuthServer, client: Client, token: str, hint: str | None = None
) -> httpx.Response:
    data = {"token": token}
    if hint is not None:
        data["token_type_hint"] = hint
    return post_token(http, server, client, data, endpoint=server.revocation_endpoint)


def test_revoke_refresh_token_kills_grant(server: AuthServer, http: httpx.Client, client: Client) -> None:
    body = code_grant(http, server, client)
    response = _revoke(http, server, client, body["refresh_token"], "refresh_token")
    assert response.status_code == 200
    assert server.revoked == [(body["refresh_token"], "refresh_token")]
    assert server.access_token_info(body["access_token"]) is None
    assert_oauth_error(refresh(http, server, client, body["refresh_token"]), 400, "invalid_grant")


def test_revoke_access_token(server: AuthServer, http: httpx.Client, client: Client) -> None:
    body = code_grant(http, server, client)
    assert _revoke(http, server, client, body["access_token"]).status_code == 200
    assert server.revoked == [(body["access_token"], None)]
    assert server.access_token_info(body["access_token"]) is None
    assert server.refresh_token_live(body["refresh_token"])


def test_revoke_unknown_token_is_ok(server: AuthServer, http: httpx.Client) -> None:
    client = server.new_client(auth_method="none")
    token = secrets.token_urlsafe(16)
    assert _revoke(http, server, client, token).status_code == 200
    assert token in server.issued


def test_revoke_requires_client_auth(server: AuthServer, http: httpx.Client) -> None:
    client = server.new_client()
    impostor = Client(client.client_id, secrets.token_urlsafe(16))
    assert_oauth_error(_revoke(http, server, impostor, "x"), 401, "invalid_client")
    assert server.revoked == []


def test_revoke_other_clients_token_is_ignored(
    server: AuthServer, http: httpx.Client, client: Client
) -> None:
    body = code_grant(http, server, client)
    other = server.new_client()
    assert _revoke(http, server, other, body["refresh_token"]).status_code == 200
    assert server.refresh_token_live(body["refresh_token"])


@pytest.mark.parametrize("status", ["500", "503"])
def test_fail_revocation(server: AuthServer, http: httpx.Client, client: Client, status: str) -> None:
    body = code_grant(http, server, client)
    server.fail_revocation = status
    assert _revoke(http, server, client, body["refresh_token"]).status_code == int(status)
    assert server.refresh_token_live(body["refresh_token"])
    server.fail_revocation = None
    assert _revoke(http, server, client, body["refresh_token"]).status_code == 200
    assert not server.refresh_token_live(body["refresh_token"])


# --------------------------------------------------------------------------- recording


def test_requests_are_recorded(server: AuthServer, http: httpx.Client, client: Client) -> None:
    before = time.monotonic()
    code_grant(http, server, client)
    http.get(server.base_url + "/.well-known/openid-configuration")
    paths = [(r.method, r.path) for r in server.requests]
    assert paths == [
        ("GET", "/authorize"),
        ("POST", "/token"),
        ("GET", "/.well-known/openid-configuration"),
    ]
    token_request = server.token_requests()[0]
    assert server.token_requests("authorization_code") == [token_request]
    assert server.token_requests("refresh_token") == []
    assert token_request.form["grant_type"] == ["authorization_code"]
    assert token_request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert all(name == name.lower() for name in token_request.headers)
    times = [r.time for r in server.requests]
    assert before <= times[0] <= times[1] <= times[2] <= time.monotonic()


# --------------------------------------------------------------------------- lifecycle


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_stop_is_prompt_during_timeout_failure() -> None:
    server = AuthServer().start()
    try:
        client = server.new_client()
        port = int(server.base_url.rsplit(":", 1)[1])
        server.fail_next("timeout", seconds=30)
        outcome: list[BaseException | int] = []

        def slow_request() -> None:
            try:
                with httpx.Client(timeout=20) as h:
                    outcome.append(post_token(h, server, client, _exchange_form(server)).status_code)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=slow_request)
        worker.start()
        deadline = time.monotonic() + 5
        while not server.token_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.token_requests(), "request never arrived"
        # An idle keep-alive connection must not hold stop() either.
        idle = httpx.Client(timeout=5)
        assert idle.get(server.base_url + "/.well-known/openid-configuration").status_code == 200
        start = time.monotonic()
        server.stop()
        assert time.monotonic() - start < 1.0
        worker.join(timeout=5)
        assert not worker.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError)
        idle.close()
        assert not _port_open(port)
    finally:
        server.stop()
    server.stop()  # idempotent


def test_context_manager_and_restart_guard() -> None:
    with AuthServer() as server:
        with pytest.raises(RuntimeError):
            server.start()
        port = int(server.base_url.rsplit(":", 1)[1])
        assert _port_open(port)
    assert not _port_open(port)


def test_no_internal_errors_after_a_busy_session(
    server: AuthServer, http: httpx.Client, client: Client
) -> None:
    # (gzip_bomb is left out: httpx would inflate all of it in memory.)
    for kind in sorted(FAILURE_KINDS - {"timeout", "close", "gzip_bomb", "drip"}):
        server.fail_next(kind)
        post_token(http, server, client, _exchange_form(server))
    code_grant(http, server, client)
    assert server.internal_errors == []
