"""Requests and answers shaped by an upstream's knobs (``authorization_params``, ``pkce``,
``token_response``...). Pure functions: the connect and refresh use cases call them.

Every value read from an answer, wherever its ``token_response`` path points, goes through the
same RFC 6749 appendix A checks as a standard answer (broker.oauth.rfc6749), and the broker's
own parameters (state, the PKCE challenge, the redirect URI) can never be replaced by a knob:
broker.config refuses those names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from broker.config import AuthBrokerConfig, Mode, TokenResponsePaths
from broker.errors import TokenRequestRejected, UpstreamUnavailable
from broker.oauth import rfc6749, rfc7636
from broker.oauth.rfc6749 import TokenResponse

AnswerParser = Callable[[int, bytes], TokenResponse]
# RFC 6749 section 5.1's field names.
_STANDARD = TokenResponsePaths()


def authorization_params(
    auth: AuthBrokerConfig, state: str, verifier: str, scopes: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """The authorization request's parameters (RFC 6749 section 4.1.1; RFC 7636 section 4.3
    unless ``pkce: none``), then ``scope_param`` joined by ``scope_separator`` (``scopes`` when
    given, else the configured ones), the resources, and the upstream's ``authorization_params``."""
    assert auth.client_id and auth.redirect_uri  # by config
    params = [
        ("response_type", "code"),
        ("client_id", auth.client_id),
        ("redirect_uri", auth.redirect_uri),
        ("state", state),
    ]
    if auth.pkce == "s256":
        params += [("code_challenge", rfc7636.challenge_s256(verifier)), ("code_challenge_method", "S256")]
    asked = scopes or auth.scopes
    if asked:
        params.append((auth.scope_param, auth.scope_separator.join(asked)))
    params += [("resource", r) for r in auth.resources()]
    params += [(k, v) for k, v in auth.authorization_params.items() if k != auth.scope_param]
    return params


def code_grant_form(auth: AuthBrokerConfig, code: str, verifier: str) -> list[tuple[str, str]]:
    """The authorization code grant (RFC 6749 section 4.1.3), plus ``token_params``."""
    assert auth.redirect_uri is not None  # by config
    form = [("grant_type", "authorization_code"), ("code", code), ("redirect_uri", auth.redirect_uri)]
    if auth.pkce == "s256":
        form.append(("code_verifier", verifier))
    form += [("resource", r) for r in auth.resources()]
    form += list(auth.token_params.items())
    return form


def refresh_grant_form(auth: AuthBrokerConfig, refresh_token: str) -> list[tuple[str, str]]:
    """The refresh grant (RFC 6749 section 6, no scope: the original grant stands), plus
    ``refresh_params``."""
    form = [("grant_type", "refresh_token"), ("refresh_token", refresh_token)]
    if auth.mode is Mode.ENTRA_OBO and auth.scopes:
        # Entra's v2 token endpoint wants the scope on a refresh too (a long-running
        # on-behalf-of credential's refresh token came from the jwt-bearer grant).
        form.append(("scope", " ".join(auth.scopes)))
    form += [("resource", r) for r in auth.resources()]
    form += list(auth.refresh_params.items())
    return form


def is_refresh(form: Sequence[tuple[str, str]]) -> bool:
    return ("grant_type", "refresh_token") in form


def token_endpoint(auth: AuthBrokerConfig, refreshing: bool) -> str:
    """``refresh_endpoint`` for a refresh when set, else the token endpoint. Both come from the
    operator's config (or a preset): nothing a caller or provider sends can change them."""
    endpoint = (auth.refresh_endpoint if refreshing else None) or auth.token_endpoint
    assert endpoint is not None  # by config, or discovered at start-up
    return endpoint


def answer_parser(auth: AuthBrokerConfig, refreshing: bool) -> AnswerParser:
    """The token answer reader for ``auth``'s knobs (see ``parse_answer``)."""
    return partial(
        parse_answer,
        paths=auth.token_response,
        separator=auth.scope_separator,
        codes=frozenset(auth.reconnect_errors),
        default_expires_in=auth.default_expires_in,
        refreshing=refreshing,
        fields={name: f.path for name, f in auth.connection_fields.items() if f.source == "token" and f.path},
    )


def parse_answer(
    status: int,
    body: bytes,
    *,
    paths: TokenResponsePaths = _STANDARD,
    separator: str = " ",
    codes: frozenset[str] = frozenset(),
    default_expires_in: int | None = None,
    refreshing: bool = False,
    fields: Mapping[str, str] | None = None,
) -> TokenResponse:
    """Read a token answer by ``paths``, or raise the broker error it amounts to.

    A refusal is TokenRequestRejected, whatever the HTTP status it came with: a 4xx, an HTTP 200
    carrying ``error`` (GitHub), or one whose ``ok`` field is not true (Slack). Only a section
    5.2 code or one of ``codes`` (the upstream's ``reconnect_errors``) is kept; one of ``codes``
    marks the grant dead. ``default_expires_in`` stands in for a missing ``expires_in`` when the
    answer or the grant has a refresh token (Salesforce sends none). ``fields``: connection
    fields read from the answer by path (see ``connection_values``)."""
    if status != 200 and not 400 <= status < 500:
        return rfc6749.parse_token_response(status, body)  # its UNAVAILABLE answers
    data = rfc6749.json_object(body) if status == 200 else _maybe_object(body)
    if status != 200 or _refused(data, paths):
        code = rfc6749.error_code(data, codes)
        raise TokenRequestRejected(status, code, reconnect=code is not None and code in codes)
    flat: dict[str, object] = {}
    for key in ("access_token", "refresh_token", "expires_in", "scope", "token_type"):
        path = getattr(paths, key)
        value = None if path is None else _at(data, path)
        if key == "scope" and isinstance(value, str) and separator != " ":
            value = " ".join(value.split(separator))
        if value is not None:
            flat[key] = value
    if paths.token_type is None:
        flat.pop("token_type", None)  # not a token type: the token is used as Bearer
    token = rfc6749.token_response_from(flat)
    if paths.refresh_token_expires_in is not None:
        # Checked like expires_in; kept only with a refresh token it can describe.
        refresh_lifetime = rfc6749.expires_in(_at(data, paths.refresh_token_expires_in))
        if refresh_lifetime is not None and token.refresh_token:
            token = dataclasses.replace(token, refresh_token_expires_in=refresh_lifetime)
    if token.expires_in is None and default_expires_in is not None and (refreshing or token.refresh_token):
        token = dataclasses.replace(token, expires_in=default_expires_in)
    if fields:
        token = dataclasses.replace(token, fields=connection_values(data, fields, token))
    return token


#: The longest connection field value kept.
MAX_FIELD_LENGTH = 2048


def connection_values(
    data: Mapping[str, object], fields: Mapping[str, str], token: TokenResponse
) -> tuple[tuple[str, str], ...]:
    """The connection fields read from a token answer, as sorted pairs. A value is kept when it
    is a string (printable, 1 to MAX_FIELD_LENGTH characters), a number or a boolean, and is
    not one of the answer's tokens; anything else (an object, a list, a token) is left out."""
    out: dict[str, str] = {}
    secrets = {token.access_token, token.refresh_token}
    for name, path in fields.items():
        value = _at(data, path)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            continue
        if field_value_ok(text) and text not in secrets:
            out[name] = text
    return tuple(sorted(out.items()))


def field_value_ok(text: str) -> bool:
    """A connection field value that may be stored and returned: printable, bounded."""
    return 0 < len(text) <= MAX_FIELD_LENGTH and text.isprintable()


def _maybe_object(body: bytes) -> dict[str, object]:
    try:
        return rfc6749.json_object(body)
    except UpstreamUnavailable:
        return {}


def _refused(data: Mapping[str, object], paths: TokenResponsePaths) -> bool:
    """An HTTP 200 that is a refusal: it carries ``error``, or its ``ok`` field is not true."""
    if data.get("error") not in (None, "", False):
        return True
    return paths.ok is not None and _at(data, paths.ok) is not True


def _at(data: Mapping[str, object], path: str) -> object:
    """The value at a dotted path (the first of its "|" alternatives that is present), or None
    where any step is missing or not an object."""
    for alternative in path.split("|"):
        value: object = data
        for step in alternative.split("."):
            value = value.get(step) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None
