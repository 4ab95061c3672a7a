"""Google, from developers.google.com "Using OAuth 2.0 for Web Server Applications".

Quirks: a refresh token is issued only when the authorization request has
``access_type=offline`` (and again on a later consent only with ``prompt=consent``); a refresh
answer has no new refresh token; a revoked grant is 400 ``invalid_grant``.
"""

from __future__ import annotations

from typing import Any

from tests.providers.emulator import CLIENT_ID, Emulator, Request


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

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
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
                "access_token": self.mint("ya29"),
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
            "access_token": self.mint("ya29"),
            "expires_in": 3599,
            "scope": grant.scope,
            "token_type": "Bearer",
        }
        if grant.refresh_token:
            answer["refresh_token"] = grant.refresh_token
        return 200, answer
