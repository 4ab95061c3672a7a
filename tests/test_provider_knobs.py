"""The quirk knobs as pure functions (broker/providers/shaping.py): requests and answers."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from broker.config import AuthBrokerConfig
from broker.errors import TokenRequestRejected, UnsupportedTokenType, UpstreamUnavailable
from broker.oauth import rfc6749
from broker.providers import shaping


def _auth(**knobs: Any) -> AuthBrokerConfig:
    return AuthBrokerConfig.model_validate(
        {
            "mode": "oauth_connect",
            "authorization_endpoint": "https://auth.test/authorize?tenant=fixed",
            "token_endpoint": "https://auth.test/token",
            "client_id": "cid",
            "redirect_uri": "https://app.test/cb",
            "scopes": ["a", "b"],
            **knobs,
        }
    )


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_authorization_params_scope_param_separator_and_pkce() -> None:
    auth = _auth(
        scope_param="user_scope",
        scope_separator=",",
        authorization_params={"access_type": "offline", "prompt": "consent"},
    )
    params = dict(shaping.authorization_params(auth, "st", "v" * 43))
    assert params["user_scope"] == "a,b" and "scope" not in params
    assert params["access_type"] == "offline" and params["prompt"] == "consent"
    assert params["code_challenge_method"] == "S256"
    url = rfc6749.authorization_url(auth.authorization_endpoint or "", list(params.items()))
    assert dict(parse_qsl(urlsplit(url).query))["tenant"] == "fixed"
    none = dict(shaping.authorization_params(_auth(pkce="none"), "st", "v" * 43))
    assert "code_challenge" not in none and "code_challenge_method" not in none
    assert none["scope"] == "a b"


def test_token_and_refresh_forms_carry_their_extra_params() -> None:
    auth = _auth(token_params={"audience": "x"}, refresh_params={"client_type": "y"}, pkce="none")
    code = shaping.code_grant_form(auth, "the-code", "verifier")
    assert ("audience", "x") in code and ("code_verifier", "verifier") not in code
    assert ("client_type", "y") not in code
    refresh = shaping.refresh_grant_form(auth, "rt")
    assert ("client_type", "y") in refresh and ("audience", "x") not in refresh
    assert not any(k == "scope" for k, _ in refresh)  # RFC 6749 section 6: the grant stands
    assert shaping.is_refresh(refresh) and not shaping.is_refresh(code)


def test_refresh_endpoint_is_used_for_refresh_only() -> None:
    auth = _auth(refresh_endpoint="https://auth.test/refresh")
    assert shaping.token_endpoint(auth, refreshing=True) == "https://auth.test/refresh"
    assert shaping.token_endpoint(auth, refreshing=False) == "https://auth.test/token"
    assert shaping.token_endpoint(_auth(), refreshing=True) == "https://auth.test/token"


@pytest.mark.parametrize(
    "body",
    [
        {"error": "bad_verification_code", "error_description": "secret-ish text"},
        {"error": "bad_refresh_token"},
        {"error": {"message": "nested"}},
    ],
)
def test_http_200_with_error_is_a_rejection_never_unavailable(body: dict[str, Any]) -> None:
    parse = shaping.answer_parser(_auth(reconnect_errors=["bad_refresh_token"]), refreshing=True)
    with pytest.raises(TokenRequestRejected) as info:
        parse(200, _body(**body))
    assert info.value.status == 200
    code = body["error"]
    if code == "bad_refresh_token":
        assert info.value.oauth_error == "bad_refresh_token" and info.value.reconnect
    else:
        assert info.value.oauth_error is None and not info.value.reconnect  # not declared: dropped
    assert "secret-ish" not in info.value.message


def test_ok_false_is_a_rejection_and_ok_must_be_true() -> None:
    parse = shaping.answer_parser(
        _auth(token_response={"ok": "ok"}, reconnect_errors=["invalid_refresh_token"]), refreshing=True
    )
    with pytest.raises(TokenRequestRejected) as info:
        parse(200, _body(ok=False, error="invalid_refresh_token"))
    assert info.value.oauth_error == "invalid_refresh_token" and info.value.reconnect
    with pytest.raises(TokenRequestRejected):
        parse(200, _body(ok="true", access_token="at"))  # only JSON true counts
    assert parse(200, _body(ok=True, access_token="at")).access_token == "at"


def test_declared_codes_pass_on_4xx_too_and_others_are_dropped() -> None:
    parse = shaping.answer_parser(_auth(reconnect_errors=["bad_refresh_token"]), refreshing=True)
    with pytest.raises(TokenRequestRejected) as info:
        parse(400, _body(error="bad_refresh_token"))
    assert info.value.oauth_error == "bad_refresh_token" and info.value.reconnect
    with pytest.raises(TokenRequestRejected) as info:
        parse(400, _body(error="made_up_code"))
    assert info.value.oauth_error is None
    with pytest.raises(TokenRequestRejected) as info:
        parse(400, _body(error="invalid_grant"))
    assert info.value.oauth_error == "invalid_grant" and not info.value.reconnect
    with pytest.raises(UpstreamUnavailable):
        parse(503, b"")


def test_nested_paths_alternatives_and_comma_scopes() -> None:
    auth = _auth(
        scope_separator=",",
        token_response={
            "ok": "ok",
            "access_token": "authed_user.access_token|access_token",
            "refresh_token": "authed_user.refresh_token|refresh_token",
            "expires_in": "authed_user.expires_in|expires_in",
            "scope": "authed_user.scope|scope",
            "token_type": None,
        },
    )
    code = shaping.answer_parser(auth, refreshing=False)(
        200,
        _body(
            ok=True,
            access_token="xoxb-bot-token",  # a bot token beside the user's: never taken
            token_type="bot",
            authed_user={
                "access_token": "xoxp-user",
                "refresh_token": "xoxe-r",
                "expires_in": 43200,
                "scope": "chat:write,search:read",
                "token_type": "user",
            },
        ),
    )
    assert (code.access_token, code.refresh_token, code.expires_in) == ("xoxp-user", "xoxe-r", 43200)
    assert code.scope == ("chat:write", "search:read") and code.token_type == "Bearer"
    refreshed = shaping.answer_parser(auth, refreshing=True)(
        200,
        _body(
            ok=True, access_token="xoxp-new", refresh_token="xoxe-new", expires_in=43200, token_type="user"
        ),
    )
    assert (refreshed.access_token, refreshed.refresh_token) == ("xoxp-new", "xoxe-new")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"authed_user": {"access_token": "bad\ntoken"}}, UpstreamUnavailable),
        ({"authed_user": {"access_token": "t" * 70000}}, UpstreamUnavailable),
        ({"authed_user": {"access_token": "ok", "scope": "a,b\x00"}}, UpstreamUnavailable),
        ({"authed_user": {"access_token": "ok", "expires_in": -5}}, UpstreamUnavailable),
        ({"authed_user": {"access_token": "ok", "token_type": "DPoP"}}, UnsupportedTokenType),
        ({"authed_user": {"access_token": 5}}, UpstreamUnavailable),
        ({"authed_user": "not an object"}, UpstreamUnavailable),
    ],
)
def test_every_value_read_by_path_is_checked_like_a_standard_answer(
    fields: dict[str, Any], error: type[Exception]
) -> None:
    auth = _auth(
        scope_separator=",",
        token_response={
            "access_token": "authed_user.access_token",
            "scope": "authed_user.scope",
            "expires_in": "authed_user.expires_in",
            "token_type": "authed_user.token_type",
        },
    )
    with pytest.raises(error):
        shaping.answer_parser(auth, refreshing=False)(200, _body(**fields))


def test_default_expires_in_only_with_a_refresh_token() -> None:
    auth = _auth(default_expires_in=7200)
    parse_code = shaping.answer_parser(auth, refreshing=False)
    assert parse_code(200, _body(access_token="a", refresh_token="r")).expires_in == 7200
    assert parse_code(200, _body(access_token="a")).expires_in is None  # nothing to refresh with
    assert parse_code(200, _body(access_token="a", refresh_token="r", expires_in=60)).expires_in == 60
    # A refresh answer keeps the grant's refresh token even when it sends none.
    assert shaping.answer_parser(auth, refreshing=True)(200, _body(access_token="a")).expires_in == 7200
    with pytest.raises(UpstreamUnavailable):
        shaping.answer_parser(_auth(), refreshing=False)(
            200, _body(access_token="a", refresh_token_expires_in="soon")
        )
