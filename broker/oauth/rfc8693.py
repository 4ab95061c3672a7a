"""RFC 8693 (OAuth 2.0 Token Exchange) and the Entra ID on-behalf-of request (RFC 7523 grant).

Pure functions: they build token request forms and check the answer. No I/O. Client
authentication is added by the caller (:class:`broker.oauth.client.ClientCredentials`).
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.errors import TokenRequestRejected, UpstreamUnavailable
from broker.oauth import rfc6749
from broker.oauth.rfc6749 import TokenResponse

# Section 2.1: the grant type of a token exchange request.
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
# RFC 7523 section 2.1: the JWT bearer grant, which Entra's on-behalf-of flow uses.
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Section 3: token type identifiers.
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"


def token_exchange_form(
    *,
    subject_token: str,
    subject_token_type: str,
    requested_token_type: str,
    audiences: Sequence[str] = (),
    resources: Sequence[str] = (),
    scopes: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """The section 2.1 request body. ``audience`` and ``resource`` may each repeat, one field
    per value; ``scope`` is the space-joined list (RFC 6749 section 3.3)."""
    form = [
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", subject_token),
        ("subject_token_type", subject_token_type),
        ("requested_token_type", requested_token_type),
    ]
    form += [("audience", a) for a in audiences]
    form += [("resource", r) for r in resources]
    if scopes:
        form.append(("scope", " ".join(scopes)))
    return form


def entra_obo_form(*, assertion: str, scopes: Sequence[str]) -> list[tuple[str, str]]:
    """Entra ID's on-behalf-of request: the user's token as a jwt-bearer ``assertion`` with
    ``requested_token_use=on_behalf_of`` and the scopes asked for (Microsoft identity platform,
    "OAuth 2.0 On-Behalf-Of flow", first case: shared secret)."""
    return [
        ("grant_type", GRANT_JWT_BEARER),
        ("assertion", assertion),
        ("requested_token_use", "on_behalf_of"),
        ("scope", " ".join(scopes)),
    ]


def check_issued_token_type(response: TokenResponse, requested_token_type: str) -> None:
    """Section 2.2.1: ``issued_token_type`` names what was issued. When present it must be what
    was asked for; a server that issues something else gave an answer the broker cannot use.
    Entra's on-behalf-of answer has no such field, and that is accepted."""
    issued = response.issued_token_type
    if issued is not None and issued != requested_token_type:
        raise UpstreamUnavailable(
            "the token endpoint sent an invalid answer: issued_token_type is not the requested type"
        )


def parse_answer(status: int, body: bytes) -> TokenResponse:
    """Read a token exchange or on-behalf-of answer (section 2.2).

    Section 2.2.2 says a refusal is an RFC 6749 section 5.2 error answer (HTTP 400), but some
    servers refuse with HTTP 200 and an ``error`` field. That is a refusal too
    (TokenRequestRejected), never an invalid answer (UpstreamUnavailable, retried as an outage).
    Only an allow-listed code is kept; the description is never read."""
    if status == 200:
        try:
            data = rfc6749.json_object(body)
        except UpstreamUnavailable:
            data = {}
        if data.get("error") not in (None, "", False):
            raise TokenRequestRejected(status, rfc6749.error_code(data, frozenset()))
    return rfc6749.parse_token_response(status, body)
