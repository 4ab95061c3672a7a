"""Microsoft Entra ID, from learn.microsoft.com "Microsoft identity platform and OAuth 2.0
authorization code flow".

Quirks covered here: the tenant sits in the path (the preset fixes it as ``common``); a refresh
token is issued only for the ``offline_access`` scope; refresh tokens are replaced on each use
(the broker must store the new one); a revoked grant is 400 ``invalid_grant`` with an AADSTS
description. ``MicrosoftTenant`` (below) serves one tenant's endpoints for the
``microsoft-tenant`` preset, whose tenant is a connection param. Not covered here:
private_key_jwt, client assertions.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tests.providers.emulator import CLIENT_ID, Emulator, Request


class Microsoft(Emulator):
    provider = "microsoft"
    authorize_path = "/common/oauth2/v2.0/authorize"
    token_path = "/common/oauth2/v2.0/token"

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        form = request.form()
        if request.path != self.token_path:
            return 404, {"error": "invalid_request"}
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.client_secret:
            return 401, {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret.",
            }
        if form.get("grant_type") == "refresh_token":
            grant = self.use_refresh(form.get("refresh_token"))
            if grant is None:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "AADSTS70008: The refresh token has expired.",
                }
        else:
            taken = self.take_code(form.get("code"))
            if taken is None:
                return 400, {"error": "invalid_grant", "error_description": "AADSTS70000: code is invalid"}
            user, query = taken
            scope = query.get("scope", "")
            grant = self.new_grant(
                user, scope.replace("offline_access", "").strip(), refresh="offline_access" in scope.split()
            )
        answer = {
            "token_type": "Bearer",
            "scope": grant.scope,
            "expires_in": 4477,
            "ext_expires_in": 4477,
            "access_token": self.mint("eyJ0eXAi"),
        }
        if grant.refresh_token:
            answer["refresh_token"] = grant.refresh_token
        return 200, answer


TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


class MicrosoftTenant(Microsoft):
    """The ``microsoft-tenant`` preset: the tenant is a connection param filled into the path.
    Only this tenant's endpoints answer; any other path is a 404."""

    provider = "microsoft-tenant"
    authorize_path = f"/{TENANT}/oauth2/v2.0/authorize"
    token_path = f"/{TENANT}/oauth2/v2.0/token"
    connection_params: ClassVar[dict[str, str]] = {"tenant": TENANT}

    def endpoints(self) -> dict[str, str]:
        return {
            "authorization_endpoint": self.base + "/{tenant}/oauth2/v2.0/authorize",
            "token_endpoint": self.base + "/{tenant}/oauth2/v2.0/token",
        }
