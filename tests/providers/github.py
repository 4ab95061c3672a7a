"""GitHub, from docs.github.com: "Authorizing OAuth apps", "Refreshing user access tokens" and
"Troubleshooting OAuth app access token request errors".

Quirks: the token endpoint answers a bad code or refresh token with HTTP 200 and an ``error``
field (``bad_verification_code``, ``bad_refresh_token``); it answers JSON only when asked with
``Accept: application/json``; the client secret goes in the form; scopes come back
comma-separated; a GitHub App's user tokens expire (8 h) and their refresh tokens rotate.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from tests.providers.emulator import CLIENT_ID, Emulator, Request


class GitHub(Emulator):
    provider = "github-app"
    authorize_path = "/login/oauth/authorize"
    token_path = "/login/oauth/access_token"

    def route(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = super().route(request)
        if request.method == "POST" and "application/json" not in request.headers.get("accept", ""):
            answer = {k: str(v) for k, v in json.loads(body).items()}
            return status, {"Content-Type": "application/x-www-form-urlencoded"}, urlencode(answer).encode()
        return status, headers, body

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        form = request.form()
        if request.path != self.token_path:
            return 404, {"message": "Not Found"}
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.client_secret:
            return 200, {"error": "incorrect_client_credentials", "error_description": "wrong secret"}
        if form.get("grant_type") == "refresh_token":
            grant = self.use_refresh(form.get("refresh_token"))
            if grant is None:
                return 200, {
                    "error": "bad_refresh_token",
                    "error_description": "The refresh token passed is incorrect or expired.",
                }
        else:
            taken = self.take_code(form.get("code"))
            if taken is None:
                return 200, {
                    "error": "bad_verification_code",
                    "error_description": "The code passed is incorrect or expired.",
                }
            user, query = taken
            grant = self.new_grant(user, query.get("scope", "").replace(" ", ","))
        return 200, {
            "access_token": self.mint("ghu"),
            "expires_in": 28800,
            "refresh_token": grant.refresh_token,
            "refresh_token_expires_in": 15811200,
            "scope": grant.scope,
            "token_type": "bearer",
        }
