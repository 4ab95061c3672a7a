"""RFC 9126 OAuth 2.0 Pushed Authorization Requests: the push (section 2.1), its answer (2.2,
2.3) and the short authorization URL that refers to it (section 4).

The push is posted through the token endpoint client's HTTP stack (same deadline, body cap,
bulkhead and client authentication as a token request), so a slow or hostile PAR endpoint is
cut at the deadline like a token endpoint. Nothing of a refusal but its status and an
allow-listed error code survives; the server's ``error_description`` is never kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from broker.errors import ClientAssertionUnavailable, TokenRequestRejected, UpstreamUnavailable
from broker.oauth import rfc6749
from broker.oauth.client import ClientCredentials, TokenEndpointClient

# Section 2.2: "expires_in ... the lifetime of the request URI in seconds". The RFC's examples
# are 60 and 90 seconds; a URI meant to live longer than an hour is not a pushed request.
MAX_EXPIRES_IN = 3600
MAX_REQUEST_URI_LENGTH = 2048
# A URI without spaces or controls (section 2.2: "request_uri: The request URI ...").
_URI = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class PushedRequest:
    """The reference to a pushed authorization request and how long it is valid."""

    request_uri: str
    expires_in: int

    def __repr__(self) -> str:
        return f"PushedRequest(<redacted>, expires_in={self.expires_in})"


class PushRejected(TokenRequestRejected):
    """The PAR endpoint refused the request (section 2.3): status and allow-listed code only."""

    def __init__(self, status: int, oauth_error: str | None) -> None:
        super().__init__(status, oauth_error)
        detail = f", error {oauth_error}" if oauth_error else ""
        self.message = (
            f"the pushed authorization request endpoint refused the request (HTTP {status}{detail})"
        )
        self.args = (self.message,)


def _bad(what: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"the pushed authorization request endpoint sent an invalid answer: {what}")


def parse_push_response(status: int, body: bytes) -> PushedRequest:
    """Section 2.2 (201 with request_uri and expires_in; 200 is accepted too) or 2.3 (an error)."""
    if 400 <= status < 500:
        raise PushRejected(status, rfc6749.error_code(body, frozenset()))
    if status not in (200, 201):
        raise UpstreamUnavailable(f"the pushed authorization request endpoint answered HTTP {status}")
    try:
        data = rfc6749.json_object(body)
    except UpstreamUnavailable:
        raise _bad("not a JSON object") from None
    uri = data.get("request_uri")
    if not isinstance(uri, str) or not uri:
        raise _bad("no request_uri")
    if len(uri) > MAX_REQUEST_URI_LENGTH or not _URI.fullmatch(uri):
        raise _bad(f"request_uri is not a URI (up to {MAX_REQUEST_URI_LENGTH} characters)")
    expires_in = data.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int):
        raise _bad("expires_in is missing or not a whole number")
    if not 1 <= expires_in <= MAX_EXPIRES_IN:
        raise _bad(f"expires_in is out of range (1 to {MAX_EXPIRES_IN} seconds)")
    return PushedRequest(uri, expires_in)


def authorization_url(authorization_endpoint: str, client_id: str, pushed: PushedRequest) -> str:
    """Section 4: the authorization request is just ``client_id`` and ``request_uri``."""
    return rfc6749.authorization_url(
        authorization_endpoint, [("client_id", client_id), ("request_uri", pushed.request_uri)]
    )


class PushClient:
    """Pushes authorization requests (section 2.1) through the token endpoint client."""

    def __init__(self, http: TokenEndpointClient) -> None:
        self._http = http

    async def push(
        self,
        endpoint: str,
        params: Sequence[tuple[str, str]],
        credentials: ClientCredentials,
        *,
        upstream: str,
    ) -> PushedRequest:
        try:
            status, body = await self._http.post_form(endpoint, params, credentials, upstream=upstream)
        except ClientAssertionUnavailable:
            raise
        except UpstreamUnavailable as exc:
            raise UpstreamUnavailable(f"the pushed authorization request failed: {exc.message}") from None
        return parse_push_response(status, body)
