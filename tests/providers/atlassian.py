"""Atlassian, from developer.atlassian.com: "OAuth 2.0 (3LO) apps" and "Implementing the Refresh
Token Flow".

Quirks: the token endpoint takes a JSON body with the client id and secret in it; the
authorization request carries ``audience=api.atlassian.com`` and ``prompt=consent``; a refresh
token is issued only with ``offline_access``, and it rotates (single use); an unknown or used
refresh token is HTTP 403 ``invalid_grant``.
"""

from __future__ import annotations

import json
from typing import Any

from tests.providers.emulator import CLIENT_ID, Emulator, Request


class Atlassian(Emulator):
    provider = "atlassian"
    authorize_path = "/authorize"
    token_path = "/oauth/token"

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        try:
            body = json.loads(request.body)
        except ValueError:
            return 400, {"error": "invalid_request", "error_description": "expected a JSON body"}
        if body.get("client_id") != CLIENT_ID or body.get("client_secret") != self.client_secret:
            return 401, {"error": "access_denied", "error_description": "Unauthorized"}
        if body.get("grant_type") == "refresh_token":
            grant = self.use_refresh(body.get("refresh_token"))  # rotating: the old one is disabled
            if grant is None:
                return 403, {
                    "error": "invalid_grant",
                    "error_description": "Unknown or invalid refresh token.",
                }
        else:
            taken = self.take_code(body.get("code"))
            if taken is None:
                return 403, {"error": "invalid_grant", "error_description": "Invalid authorization code"}
            user, query = taken
            if query.get("audience") != "api.atlassian.com":
                return 403, {"error": "invalid_grant"}
            scope = query.get("scope", "")
            grant = self.new_grant(user, scope, refresh="offline_access" in scope.split())
        answer = {
            "access_token": self.mint("atl"),
            "expires_in": 3600,
            "scope": grant.scope,
            "token_type": "Bearer",
        }
        if grant.refresh_token:
            answer["refresh_token"] = grant.refresh_token
        return 200, answer
