"""QuickBooks Online (Intuit), from developer.intuit.com "OAuth 2.0" (QuickBooks Online
Accounting API, authentication and authorization).

Quirks: the callback carries ``realmId`` (the company id the app needs in every API URL) beside
the code and state; client credentials go as HTTP Basic; the answer has ``expires_in`` (3600)
and ``x_refresh_token_expires_in`` (about 100 days) and no scope; refresh tokens rotate; a dead
refresh token is 400 ``invalid_grant``; revocation takes a JSON body ``{"token": ...}`` (not a
form), and revoking a refresh token ends the grant.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar
from urllib.parse import urlencode

from tests.providers.emulator import CLIENT_ID, Emulator, Grant, Request

REALM_ID = "9130355400000123"


class QuickBooks(Emulator):
    provider = "quickbooks"
    authorize_path = "/connect/oauth2"
    token_path = "/oauth2/v1/tokens/bearer"
    revoke_path: ClassVar[str] = "/v2/oauth2/tokens/revoke"

    def start(self) -> QuickBooks:
        self.revoked: list[str] = []
        self.access: dict[str, Grant] = {}
        super().start()
        return self

    def endpoints(self) -> dict[str, str]:
        return {
            "authorization_endpoint": self.base + self.authorize_path,
            "token_endpoint": self.base + self.token_path,
            "revocation_endpoint": self.base + self.revoke_path,
        }

    def authorization(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        query = request.query
        code = self.mint("code")
        self.codes[code] = (query.get("emulated_user", ""), query)
        callback = {"code": code, "state": query.get("state", ""), "realmId": REALM_ID}
        return 302, {"Location": f"{query['redirect_uri']}?{urlencode(callback)}"}, b""

    def route(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        if request.method == "POST" and request.path == self.revoke_path:
            status, answer = self.revoke(request)
            return status, {"Content-Type": "application/json"}, json.dumps(answer).encode()
        return super().route(request)

    def revoke(self, request: Request) -> tuple[int, dict[str, Any]]:
        if request.basic() != (CLIENT_ID, self.client_secret):
            return 401, {"error": "invalid_client"}
        if not request.headers.get("content-type", "").startswith("application/json"):
            return 400, {"error": "invalid_request", "error_description": "JSON body expected"}
        token = str(request.json().get("token", ""))
        grant = self.grants.get(token) or self.access.get(token)
        if grant is None:
            return 400, {"error": "invalid_token"}
        grant.dead = True
        self.revoked.append(token)
        return 200, {}

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        form = request.form()
        if request.path != self.token_path:
            return 404, {"error": "invalid_request"}
        if request.basic() != (CLIENT_ID, self.client_secret):
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") == "refresh_token":
            grant = self.use_refresh(form.get("refresh_token"))
            if grant is None:
                return 400, {"error": "invalid_grant"}
        else:
            taken = self.take_code(form.get("code"))
            if taken is None:
                return 400, {"error": "invalid_grant"}
            grant = self.new_grant(taken[0], taken[1].get("scope", ""))
        access = self.mint("eyJlbmMiOiJBMTI4Q0JDLUhTMjU2")
        self.access[access] = grant
        return 200, {
            "token_type": "bearer",
            "access_token": access,
            "expires_in": 3600,
            "refresh_token": grant.refresh_token,
            "x_refresh_token_expires_in": 8726400,
        }
