"""Pure protocol pieces: PKCE, authorization URLs, token response parsing."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qsl, urlsplit

import pytest

from broker.errors import TokenRequestRejected, UnsupportedTokenType, UpstreamUnavailable
from broker.oauth import rfc6749, rfc7636


def test_pkce_rfc7636_appendix_b_vector() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert rfc7636.challenge_s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_verifier_and_state_shape() -> None:
    verifiers = {rfc7636.new_verifier() for _ in range(50)}
    assert len(verifiers) == 50
    for v in verifiers:
        assert len(v) == 43 and "=" not in v
        assert len(base64.urlsafe_b64decode(v + "=")) == 32
    assert len(rfc7636.new_state()) == 43


def test_authorization_url_keeps_existing_query() -> None:
    url = rfc6749.authorization_url(
        "https://as.example/authorize?tenant=a%20b", [("state", "s/1"), ("scope", "a b")]
    )
    parts = urlsplit(url)
    assert parse_qsl(parts.query) == [("tenant", "a b"), ("state", "s/1"), ("scope", "a b")]
    assert parts.path == "/authorize" and "%20" in parts.query


def test_basic_credentials_form_encodes_before_base64() -> None:
    header = rfc6749.basic_credentials("id:1", "sec ret&")
    assert base64.b64decode(header.removeprefix("Basic ")).decode() == "id%3A1:sec%20ret%26"


def _body(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def test_parse_success_and_defaults() -> None:
    token = rfc6749.parse_token_response(200, _body(access_token="at", expires_in="3600", scope="a b"))
    assert token.token_type == "Bearer" and token.expires_in == 3600 and token.scope == ("a", "b")
    assert token.refresh_token is None and "at" not in repr(token)
    no_expiry = rfc6749.parse_token_response(200, _body(access_token="at", token_type="bearer"))
    assert no_expiry.expires_in is None and no_expiry.token_type == "Bearer"
    # Issue 12 item 5: a type the broker cannot send (it sends Bearer only) is refused, by name.
    with pytest.raises(UnsupportedTokenType, match="'mac'"):
        rfc6749.parse_token_response(200, _body(access_token="at", token_type="mac"))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b"not json"),
        (200, b"[1,2]"),
        (200, _body(token_type="Bearer")),
        (200, _body(access_token=5)),
        (200, _body(access_token="")),
        (200, _body(access_token="at", expires_in=-5)),
        (200, _body(access_token="at", expires_in=10**12)),
        (200, _body(access_token="at", expires_in="soon")),
        (200, _body(access_token="at", expires_in=True)),
        (200, _body(access_token="at", refresh_token=7)),
        (200, _body(access_token="a\nb")),
        (201, _body(access_token="at")),
        (500, _body(error="server_error")),
        (503, b""),
    ],
)
def test_parse_rejects_bad_answers_as_unavailable(status: int, body: bytes) -> None:
    with pytest.raises(UpstreamUnavailable) as info:
        rfc6749.parse_token_response(status, body)
    assert "at" not in info.value.message.split()


def test_error_codes_are_allow_listed_and_descriptions_dropped() -> None:
    secret = "rt_very_secret_value"
    with pytest.raises(TokenRequestRejected) as info:
        rfc6749.parse_token_response(400, _body(error="invalid_grant", error_description=secret))
    assert info.value.oauth_error == "invalid_grant" and secret not in str(info.value)
    with pytest.raises(TokenRequestRejected) as info:
        rfc6749.parse_token_response(400, _body(error=f"<b>{secret}</b>"))
    assert info.value.oauth_error is None and secret not in str(info.value)
    assert info.value.metadata == {"http_status": "400"}


def test_deeply_nested_metadata_is_not_json_not_a_crash() -> None:
    """A hostile discovery answer nested past the JSON decoder's recursion limit is a plain
    'not JSON' refusal (start-up names the issuer), never a RecursionError."""
    from broker.oauth.rfc8414 import parse_metadata

    with pytest.raises(ValueError, match="not JSON"):
        parse_metadata("https://as.test", 200, b"[" * 100_000 + b"]" * 100_000)
