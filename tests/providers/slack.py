"""Slack, from docs.slack.dev: "Installing with OAuth", the oauth.v2.access method and "Using
token rotation".

Quirks: user scopes are asked for with ``user_scope`` (comma-separated); the code answer nests
the user's token under ``authed_user`` beside app and team fields; a refresh answer is flat;
every answer is HTTP 200 with ``ok`` true or false, errors named in ``error``
(``invalid_code``, ``invalid_refresh_token``); token_type is "user", not an RFC 6750 type.
"""

from __future__ import annotations

from typing import Any

from tests.providers.emulator import CLIENT_ID, Emulator, Request


class Slack(Emulator):
    provider = "slack"
    authorize_path = "/oauth/v2/authorize"
    token_path = "/api/oauth.v2.access"

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        form = request.form()
        if request.basic() != (CLIENT_ID, self.client_secret):
            return 200, {"ok": False, "error": "invalid_client_id"}
        if form.get("grant_type") == "refresh_token":
            grant = self.use_refresh(form.get("refresh_token"))
            if grant is None:
                return 200, {"ok": False, "error": "invalid_refresh_token"}
            return 200, {
                "ok": True,
                "app_id": "A0EMULATED",
                "access_token": self.mint("xoxe.xoxp"),
                "token_type": "user",
                "scope": grant.scope,
                "refresh_token": grant.refresh_token,
                "expires_in": 43200,
                "team": {"id": "T0EMULATED"},
            }
        taken = self.take_code(form.get("code"))
        if taken is None:
            return 200, {"ok": False, "error": "invalid_code"}
        user, query = taken
        grant = self.new_grant(user, query.get("user_scope", ""))
        return 200, {
            "ok": True,
            "app_id": "A0EMULATED",
            # The app's bot token sits at the top level: never the user's credential.
            "access_token": self.mint("xoxb"),
            "token_type": "bot",
            "scope": "commands",
            "authed_user": {
                "id": "U0EMULATED",
                "scope": grant.scope,
                "access_token": self.mint("xoxe.xoxp"),
                "token_type": "user",
                "refresh_token": grant.refresh_token,
                "expires_in": 43200,
            },
            "team": {"id": "T0EMULATED", "name": "Emulated"},
            "enterprise": None,
            "is_enterprise_install": False,
        }
