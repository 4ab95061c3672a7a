"""Salesforce, from help.salesforce.com: "OAuth 2.0 Web Server Flow for Web App Integration"
and "OAuth 2.0 Refresh Token Flow".

Quirks: no ``expires_in`` in any answer (the session timeout is an org setting); the answer
carries ``instance_url``, ``id``, ``issued_at`` and ``signature``; a refresh answer has no
refresh token; a dead refresh token is 400 ``invalid_grant``.
"""

from __future__ import annotations

from typing import Any

from tests.providers.emulator import CLIENT_ID, Emulator, Request


class Salesforce(Emulator):
    provider = "salesforce"
    authorize_path = "/services/oauth2/authorize"
    token_path = "/services/oauth2/token"

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        form = request.form()
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.client_secret:
            return 400, {"error": "invalid_client", "error_description": "invalid client credentials"}
        common = {
            "instance_url": "https://emulated.my.salesforce.com",
            "id": "https://login.salesforce.com/id/00D/005",
            "token_type": "Bearer",
            "issued_at": "1700000000000",
            "signature": "c2lnbmF0dXJl",
        }
        if form.get("grant_type") == "refresh_token":
            grant = self.use_refresh(form.get("refresh_token"), rotate=False)
            if grant is None:
                return 400, {"error": "invalid_grant", "error_description": "expired access/refresh token"}
            return 200, {"access_token": self.mint("00D!sf"), "scope": grant.scope, **common}
        taken = self.take_code(form.get("code"))
        if taken is None:
            return 400, {"error": "invalid_grant", "error_description": "invalid authorization code"}
        grant = self.new_grant(taken[0], taken[1].get("scope", ""))
        return 200, {
            "access_token": self.mint("00D!sf"),
            "refresh_token": grant.refresh_token,
            "scope": grant.scope,
            **common,
        }
