"""Notion, from developers.notion.com: "Authorization", "Create a token", "Refresh a token".

Quirks: the token endpoint takes a JSON body (not a form) and the client id and secret only
as HTTP Basic; the authorization request carries ``owner=user``; no scopes.
"""

from __future__ import annotations

import json
from typing import Any

from tests.providers.emulator import CLIENT_ID, Emulator, Request


class Notion(Emulator):
    provider = "notion"
    authorize_path = "/v1/oauth/authorize"
    token_path = "/v1/oauth/token"

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        if request.basic() != (CLIENT_ID, self.client_secret):
            return 401, {"object": "error", "status": 401, "code": "unauthorized", "error": "invalid_client"}
        if not request.headers.get("content-type", "").startswith("application/json"):
            return 400, {"error": "invalid_request", "error_description": "body must be JSON"}
        try:
            body = json.loads(request.body)
        except ValueError:
            return 400, {"error": "invalid_request"}
        if body.get("grant_type") == "refresh_token":
            grant = self.use_refresh(body.get("refresh_token"))
            if grant is None:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
        else:
            taken = self.take_code(body.get("code"))
            if taken is None or taken[1].get("owner") != "user":
                return 400, {"error": "invalid_grant"}
            grant = self.new_grant(taken[0], "")
        return 200, {
            "access_token": self.mint("ntn"),
            "token_type": "bearer",
            "refresh_token": grant.refresh_token,
            "bot_id": "b0a7e0aa-0000-4000-8000-000000000000",
            "workspace_id": "a0a7e0aa-0000-4000-8000-000000000000",
            "workspace_name": "Emulated",
            "owner": {"type": "user", "user": {"object": "user", "id": "u1"}},
        }
