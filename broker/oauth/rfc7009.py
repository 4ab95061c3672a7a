"""RFC 7009 OAuth 2.0 Token Revocation: the request (section 2.1) and its answer (section 2.2)."""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import UpstreamUnavailable
from broker.oauth.client import ClientCredentials, TokenEndpointClient

REVOKED = "revoked"
NOT_SUPPORTED = "not_supported"
FAILED = "failed"
ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class RevocationOutcome:
    """What happened to one token. ``reason`` is a short class, never the server's text."""

    token_type_hint: str
    outcome: str
    reason: str = ""


class RevocationClient:
    """Posts revocation requests through the token endpoint client's HTTP stack (same limits,
    same error translation, same client authentication)."""

    def __init__(self, http: TokenEndpointClient) -> None:
        self._http = http

    async def revoke(
        self,
        endpoint: str | None,
        token: str | None,
        token_type_hint: str,
        credentials: ClientCredentials,
        json_body: bool = False,
    ) -> RevocationOutcome:
        """Revoke ``token`` (section 2.1: a form; ``json_body`` sends the same fields as a JSON
        object, for servers that document that instead)."""
        if not token:
            return RevocationOutcome(token_type_hint, ABSENT)
        if endpoint is None:
            return RevocationOutcome(token_type_hint, NOT_SUPPORTED, "no_revocation_endpoint")
        form = [("token", token), ("token_type_hint", token_type_hint)]
        try:
            status, _ = await self._http.post_form(
                endpoint, form, credentials, json_body=json_body, call="revocation"
            )
        except UpstreamUnavailable:
            return RevocationOutcome(token_type_hint, FAILED, "unreachable")
        # Section 2.2: 200 means revoked, or the token was already invalid (same thing to us).
        if status == 200:
            return RevocationOutcome(token_type_hint, REVOKED)
        # Section 2.2.1: 503 asks to retry later; anything else is a refusal. The body's
        # error_description is never kept.
        return RevocationOutcome(token_type_hint, FAILED, f"http_{status}")
