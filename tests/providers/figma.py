"""Figma, from developers.figma.com "Authentication" (OAuth 2 apps).

Quirks: the code is exchanged at /v1/oauth/token but refreshed at a separate URL,
/v1/oauth/refresh, whose answer has a new access token and its lifetime but no refresh token
(the old one stays valid). Client credentials go as HTTP Basic.
"""

from __future__ import annotations

from typing import Any

from tests.providers.emulator import CLIENT_ID, Emulator, Request


class Figma(Emulator):
    provider = "figma"
    authorize_path = "/oauth"
    token_path = "/v1/oauth/token"
    refresh_path = "/v1/oauth/refresh"

    def endpoints(self) -> dict[str, str]:
        return {
            "authorization_endpoint": self.base + self.authorize_path,
            "token_endpoint": self.base + self.token_path,
            "refresh_endpoint": self.base + self.refresh_path,
        }

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        form = request.form()
        if request.basic() != (CLIENT_ID, self.client_secret):
            return 401, {"error": "invalid_client"}
        if request.path == self.refresh_path and form.get("grant_type") == "refresh_token":
            grant = self.use_refresh(form.get("refresh_token"), rotate=False)
            if grant is None:
                return 400, {"error": "invalid_grant"}
            return 200, {"access_token": self.mint("figu"), "token_type": "bearer", "expires_in": 7776000}
        if request.path != self.token_path or form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        taken = self.take_code(form.get("code"))
        if taken is None:
            return 400, {"error": "invalid_grant"}
        grant = self.new_grant(taken[0], taken[1].get("scope", ""))
        return 200, {
            "user_id_string": "1",
            "access_token": self.mint("figu"),
            "token_type": "bearer",
            "expires_in": 7776000,
            "refresh_token": grant.refresh_token,
        }
