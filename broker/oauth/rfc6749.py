"""RFC 6749 (OAuth 2.0): authorization request URLs, token request forms, token responses.

Pure functions: no I/O. Errors are raised as the broker's own types; messages never carry a
token or the server's ``error_description``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from broker.errors import TokenRequestRejected, UpstreamUnavailable

# Section 5.2 error codes, plus RFC 8693 section 2.2.2 and the OpenID Connect Core 3.1.2.6
# codes identity providers (Entra among them) answer token requests with. Anything else the
# server says is dropped: it is untrusted free text that may echo secrets.
ALLOWED_ERROR_CODES = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "interaction_required",
        "consent_required",
        "login_required",
        "temporarily_unavailable",
        "server_error",
    }
)

MAX_EXPIRES_IN = 10 * 365 * 24 * 3600
MAX_TOKEN_LENGTH = 64 * 1024


def authorization_url(endpoint: str, params: Sequence[tuple[str, str]]) -> str:
    """Append the request parameters (section 4.1.1) to the endpoint, keeping its own query."""
    parts = urlsplit(endpoint)
    query = urlencode(list(params), quote_via=quote)
    merged = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit((parts.scheme, parts.netloc, parts.path, merged, ""))


def basic_credentials(client_id: str, client_secret: str) -> str:
    """The Authorization header value for client_secret_basic (section 2.3.1): the id and secret
    are form-urlencoded before being joined and base64-encoded."""
    pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A successful token endpoint answer (section 5.1; RFC 8693 section 2.2.1)."""

    access_token: str
    token_type: str
    expires_in: int | None
    refresh_token: str | None
    scope: tuple[str, ...] | None
    issued_token_type: str | None

    def __repr__(self) -> str:
        return f"TokenResponse(<redacted>, expires_in={self.expires_in!r})"


def _bad(what: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"the token endpoint sent an invalid answer: {what}")


def _optional_str(data: Mapping[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TOKEN_LENGTH:
        raise _bad(f"{key} is not a string")
    return value or None


def parse_token_response(status: int, body: bytes) -> TokenResponse:
    """Parse a token endpoint answer, or raise the broker error it amounts to."""
    if status >= 500:
        raise UpstreamUnavailable(f"the token endpoint answered HTTP {status}")
    if 400 <= status < 500:
        raise TokenRequestRejected(status, _error_code(body))
    if status != 200:
        raise UpstreamUnavailable(f"the token endpoint answered HTTP {status}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _bad("not JSON") from None
    if not isinstance(data, dict):
        raise _bad("not a JSON object")
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise _bad("no access_token")
    if len(access) > MAX_TOKEN_LENGTH or not access.isprintable():
        raise _bad("access_token is not a printable string")
    token_type = _optional_str(data, "token_type") or "Bearer"
    expires_in = _expires_in(data.get("expires_in"))
    scope = _optional_str(data, "scope")
    return TokenResponse(
        access_token=access,
        token_type=token_type,
        expires_in=expires_in,
        refresh_token=_optional_str(data, "refresh_token"),
        scope=tuple(scope.split()) if scope is not None else None,
        issued_token_type=_optional_str(data, "issued_token_type"),
    )


def _expires_in(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():  # some servers send "3600"
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("expires_in is not a number")
    if not math.isfinite(value) or not 0 <= value <= MAX_EXPIRES_IN:
        raise _bad("expires_in is out of range")
    return int(value)


def _error_code(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and code in ALLOWED_ERROR_CODES else None


# Section 4.1.2.1: the error codes an authorization response may carry.
ALLOWED_AUTHORIZE_ERROR_CODES = frozenset(
    {
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
    }
)
