"""Google, from developers.google.com "Using OAuth 2.0 for Web Server Applications".

Quirks: a refresh token is issued only when the authorization request has
``access_type=offline`` (and again on a later consent only with ``prompt=consent``); a refresh
answer has no new refresh token; a revoked grant is 400 ``invalid_grant``. Revocation ("Revoking
a token"): POST /revoke with ``token`` in a form, 200 when revoked, 400 ``invalid_token``
otherwise; revoking either token of a grant ends the grant.
"""

from __future__ import annotations

from typing import Any

from tests.providers.emulator import CLIENT_ID, Emulator, Grant, Request


class Google(Emulator):
    provider = "google"
    authorize_path = "/o/oauth2/v2/auth"
    token_path = "/token"

    def endpoints(self) -> dict[str, str]:
        return {
            "authorization_endpoint": self.base + self.authorize_path,
            "token_endpoint": self.base + self.token_path,
            "revocation_endpoint": self.base + "/revoke",
        }

    revoke_path = "/revoke"

    def start(self) -> Google:
        self.access: dict[str, Grant] = {}
        self.revoked: list[str] = []
        super().start()
        return self

    def _access(self, grant: Grant) -> str:
        token = self.mint("ya29")
        self.access[token] = grant
        return token

    def revoke(self, request: Request) -> tuple[int, dict[str, Any]]:
        token = request.form().get("token", "")
        grant = self.grants.get(token) or self.access.get(token)
        if grant is None:
            return 400, {"error": "invalid_token", "error_description": "Token expired or revoked"}
        grant.dead = True
        self.revoked.append(token)
        return 200, {}

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        if request.path == self.revoke_path:
            return self.revoke(request)
        form = request.form()
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
        if form.get("grant_type") == "refresh_token":
            grant = self.use_refresh(form.get("refresh_token"), rotate=False)
            if grant is None:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
            return 200, {
                "access_token": self._access(grant),
                "expires_in": 3599,
                "scope": grant.scope,
                "token_type": "Bearer",
            }
        taken = self.take_code(form.get("code"))
        if taken is None:
            return 400, {"error": "invalid_grant", "error_description": "Malformed auth code."}
        user, query = taken
        offline = query.get("access_type") == "offline" and query.get("prompt") == "consent"
        grant = self.new_grant(user, query.get("scope", ""), refresh=offline)
        answer = {
            "access_token": self._access(grant),
            "expires_in": 3599,
            "scope": grant.scope,
            "token_type": "Bearer",
        }
        if grant.refresh_token:
            answer["refresh_token"] = grant.refresh_token
        return 200, answer
