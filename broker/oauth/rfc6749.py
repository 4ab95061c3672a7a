"""RFC 6749 (OAuth 2.0): authorization request URLs, token request forms, token responses.

Pure functions: no I/O. Errors are raised as the broker's own types; messages never carry a
token or the server's ``error_description``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from broker.errors import TokenRequestRejected, UnsupportedTokenType, UpstreamUnavailable

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
MAX_TOKEN_TYPE_LENGTH = 128
MAX_SCOPE_LENGTH = 16 * 1024
MAX_ISSUED_TOKEN_TYPE_LENGTH = 512

# Appendix A.12 / A.17: access-token = refresh-token = 1*VSCHAR, VSCHAR = %x20-7E.
_VSCHAR = re.compile(r"[\x20-\x7e]+")
# Appendix A.4: scope-token = 1*NQCHAR, NQCHAR = %x21 / %x23-5B / %x5D-7E.
_NQCHAR = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
# Appendix A.13: token-type = type-name / URI-reference, type-name = 1*( ALPHA / DIGIT / "-" /
# "." / "_" ). Also "~", "+", "/" (RFC 7235 token68) and ":" (for URI-style names): enough to
# name what was issued in an error, never a space, quote, "=" or control character.
_TOKEN_TYPE = re.compile(r"[A-Za-z0-9\-._~+/:]+")
# RFC 8693 section 3: a token type identifier is a URI; printable ASCII without spaces.
_ISSUED_TOKEN_TYPE = re.compile(r"[\x21-\x7e]+")
# Appendix A.14: expires-in = 1*DIGIT. Some servers send it as a string of (ASCII) digits.
_DIGITS = re.compile(r"[0-9]{1,12}")
# RFC 6749 section 7.1: the token types the broker can send. It sends tokens only as Bearer
# (RFC 6750), so any other type (DPoP, RFC 9449; MAC) is refused rather than sent as Bearer.
SUPPORTED_TOKEN_TYPES = {"bearer": "Bearer"}


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
    # Values an upstream's connection_fields read from the answer (never a token), as pairs.
    fields: tuple[tuple[str, str], ...] = ()
    # The refresh token's lifetime in seconds, when the server says (GitHub, QuickBooks): not
    # in RFC 6749, read through the upstream's token_response.refresh_token_expires_in path.
    refresh_token_expires_in: int | None = None

    def __repr__(self) -> str:
        return f"TokenResponse(<redacted>, expires_in={self.expires_in!r})"


def _bad(what: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"the token endpoint sent an invalid answer: {what}")


def _optional_str(data: Mapping[str, object], key: str) -> str | None:
    """A string field, or None when it is absent, null or empty."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{key} is not a string")
    return value or None


def _token(data: Mapping[str, object], key: str) -> str | None:
    """Appendix A.12 / A.17: an access or refresh token is 1*VSCHAR, bounded."""
    value = _optional_str(data, key)
    if value is not None and (len(value) > MAX_TOKEN_LENGTH or not _VSCHAR.fullmatch(value)):
        raise _bad(f"{key} is not printable ASCII (up to {MAX_TOKEN_LENGTH} characters)")
    return value


def _token_type(data: Mapping[str, object]) -> str:
    """Section 5.1 / appendix A.13, matched without regard to case (section 5.1: "The value is
    case insensitive") and normalised to its registered spelling. Absent means Bearer, as
    servers that leave it out issue bearer tokens."""
    value = _optional_str(data, "token_type")
    if value is None:
        return "Bearer"
    if len(value) > MAX_TOKEN_TYPE_LENGTH or not _TOKEN_TYPE.fullmatch(value):
        raise _bad(f"token_type is not a token type name (up to {MAX_TOKEN_TYPE_LENGTH} characters)")
    supported = SUPPORTED_TOKEN_TYPES.get(value.lower())
    if supported is None:
        # The name passed the syntax check above, so it is safe to show.
        raise UnsupportedTokenType(
            f"the token endpoint issued a token of type {value!r}, which the broker cannot use: "
            "it sends tokens only as Bearer (RFC 6750); configure the client at the authorization "
            "server for bearer tokens"
        )
    return supported


def _scope(data: Mapping[str, object]) -> tuple[str, ...] | None:
    """Appendix A.4: scope-token *( SP scope-token ), each 1*NQCHAR. Runs of spaces (and spaces
    at the ends) are tolerated; any other whitespace or character is not. A JSON array of
    scope-tokens (Twitch sends one) is read as the same list."""
    listed = data.get("scope")
    if isinstance(listed, list):
        if not all(isinstance(word, str) and _NQCHAR.fullmatch(word) for word in listed):
            raise _bad("scope is not a list of scope tokens")
        data = {"scope": " ".join(listed)}
    value = _optional_str(data, "scope")
    if value is None:
        return None
    words = tuple(word for word in value.split(" ") if word)
    if len(value) > MAX_SCOPE_LENGTH or not all(_NQCHAR.fullmatch(word) for word in words):
        raise _bad(
            f"scope is not a list of space-separated scope tokens (up to {MAX_SCOPE_LENGTH} characters)"
        )
    return words or None


def _issued_token_type(data: Mapping[str, object]) -> str | None:
    """RFC 8693 section 2.2.1: a token type identifier (a URI). Only compared, never stored."""
    value = _optional_str(data, "issued_token_type")
    if value is not None and (
        len(value) > MAX_ISSUED_TOKEN_TYPE_LENGTH or not _ISSUED_TOKEN_TYPE.fullmatch(value)
    ):
        raise _bad("issued_token_type is not a token type identifier")
    return value


def well_formed(access_token: str, refresh_token: str | None, token_type: str, scopes: Sequence[str]) -> bool:
    """Whether stored token fields have the syntax an answer must have (appendix A): a record
    written before answers were checked is refused on read rather than served malformed."""
    return (
        len(access_token) <= MAX_TOKEN_LENGTH
        and _VSCHAR.fullmatch(access_token) is not None
        and (
            refresh_token is None
            or (len(refresh_token) <= MAX_TOKEN_LENGTH and _VSCHAR.fullmatch(refresh_token) is not None)
        )
        and len(token_type) <= MAX_TOKEN_TYPE_LENGTH
        and _TOKEN_TYPE.fullmatch(token_type) is not None
        and all(_NQCHAR.fullmatch(scope) is not None for scope in scopes)
    )


def parse_token_response(status: int, body: bytes) -> TokenResponse:
    """Parse a token endpoint answer, or raise the broker error it amounts to.

    Every field of a successful answer is checked against its syntax (appendix A) and length
    before anything is built from it, so nothing a server sends can be stored that the store,
    the wire (protobuf strings are UTF-8) or a log line cannot carry. A failed check is the one
    invalid-answer error (UpstreamUnavailable); an unsupported token type is UnsupportedTokenType.
    """
    if status >= 500:
        raise UpstreamUnavailable(f"the token endpoint answered HTTP {status}")
    if 400 <= status < 500:
        raise TokenRequestRejected(status, _error_code(body))
    if status != 200:
        raise UpstreamUnavailable(f"the token endpoint answered HTTP {status}")
    return token_response_from(json_object(body))


def json_object(body: bytes) -> dict[str, object]:
    """A token answer's body as a JSON object, or the invalid-answer error."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad("not JSON") from None
    if not isinstance(data, dict):
        raise _bad("not a JSON object")
    return data


def token_response_from(data: Mapping[str, object]) -> TokenResponse:
    """A successful answer's fields, each checked against its syntax and length (appendix A)."""
    access = _token(data, "access_token")
    if access is None:
        raise _bad("no access_token")
    return TokenResponse(
        access_token=access,
        token_type=_token_type(data),
        expires_in=_expires_in(data.get("expires_in")),
        refresh_token=_token(data, "refresh_token"),
        scope=_scope(data),
        issued_token_type=_issued_token_type(data),
    )


def expires_in(value: object) -> int | None:
    """A lifetime in seconds checked as ``expires_in`` is (appendix A.14)."""
    return _expires_in(value)


def _expires_in(value: object) -> int | None:
    """Appendix A.14: a non-negative number of seconds, at most MAX_EXPIRES_IN. A string of
    ASCII digits and a finite number are accepted (servers send both); a fraction is dropped."""
    if value is None:
        return None
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value.strip(" ")):
            raise _bad("expires_in is not a number")
        value = int(value.strip(" "))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("expires_in is not a number")
    # The range check comes first: comparing an int with a float is exact in Python, while
    # math.isfinite(int) converts to float and overflows on a JSON integer of 309+ digits. NaN
    # fails every comparison, so it is out of range too.
    if not 0 <= value <= MAX_EXPIRES_IN or not math.isfinite(value):
        raise _bad("expires_in is out of range")
    return int(value)


def _error_code(body: bytes) -> str | None:
    return error_code(body, frozenset())


def error_code(body: bytes | Mapping[str, object], also: frozenset[str]) -> str | None:
    """The ``error`` of an error answer when it is a section 5.2 code or one in ``also`` (codes a
    provider preset declares); None for anything else, which is untrusted free text."""
    if isinstance(body, bytes):
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    else:
        data = body
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and (code in ALLOWED_ERROR_CODES or code in also) else None


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
