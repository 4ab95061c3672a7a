"""Zendesk, from developer.zendesk.com: "OAuth Tokens for Grant Types" (Create Token for Grant
Type), "Working with OAuth refresh tokens" and "Using PKCE to make Zendesk OAuth access tokens
more secure".

Quirks: every URL is on the account's own host, ``https://{subdomain}.zendesk.com/oauth/...``
(here the subdomain is the first path segment of the loopback emulator); token requests are a
JSON object with the client id and secret in it; PKCE (S256) is checked when the authorization
request carried a challenge; the answer carries ``refresh_token`` and
``refresh_token_expires_in``; refresh tokens are replaced on use; a dead grant is 400
``invalid_grant``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, ClassVar
from urllib.parse import urlencode

from tests.providers.emulator import CLIENT_ID, Emulator, Request

_PATH = re.compile(r"^/([a-z0-9][a-z0-9-]{0,62})(/oauth/(?:authorizations/new|tokens))$")


class Zendesk(Emulator):
    provider = "zendesk"
    authorize_path = "/oauth/authorizations/new"
    token_path = "/oauth/tokens"
    connection_params: ClassVar[dict[str, str]] = {"subdomain": "acme-support"}

    def start(self) -> Zendesk:
        self.subdomains: dict[int, str] = {}  # grant -> the account it was granted at
        super().start()
        return self

    def endpoints(self) -> dict[str, str]:
        return {
            "authorization_endpoint": self.base + "/{subdomain}" + self.authorize_path,
            "token_endpoint": self.base + "/{subdomain}" + self.token_path,
        }

    def authorization_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith(self.authorize_path)]

    def route(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        found = _PATH.match(request.path)
        if found is None:
            return 404, {"Content-Type": "text/plain"}, b"Not Found"
        subdomain, path = found.groups()
        if request.method == "GET" and path == self.authorize_path:
            query = request.query
            code = self.mint("code")
            self.codes[code] = (query.get("emulated_user", ""), {**query, "subdomain": subdomain})
            callback = {"code": code, "state": query.get("state", "")}
            return 302, {"Location": f"{query['redirect_uri']}?{urlencode(callback)}"}, b""
        status, answer = self.token_at(subdomain, request)
        return status, {"Content-Type": "application/json"}, json.dumps(answer).encode()

    def token_at(self, subdomain: str, request: Request) -> tuple[int, dict[str, Any]]:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return 400, {"error": "invalid_request", "error_description": "JSON expected"}
        body = {k: str(v) for k, v in request.json().items()}
        if body.get("client_id") != CLIENT_ID or body.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client", "error_description": "Client authentication failed."}
        if body.get("grant_type") == "refresh_token":
            known = self.grants.get(body.get("refresh_token") or "")
            same = known is not None and self.subdomains.get(id(known)) == subdomain
            grant = self.use_refresh(body.get("refresh_token")) if same else None
            if grant is None:
                return 400, {"error": "invalid_grant", "error_description": "The refresh token is invalid."}
        else:
            taken = self.take_code(body.get("code"))
            if taken is None or taken[1].get("subdomain") != subdomain:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "The authorization code is invalid.",
                }
            user, query = taken
            challenge = query.get("code_challenge")
            if challenge is not None:
                digest = hashlib.sha256(body.get("code_verifier", "").encode()).digest()
                if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != challenge:
                    return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed."}
            grant = self.new_grant(user, query.get("scope", ""))
            self.subdomains[id(grant)] = subdomain
        return 200, {
            "access_token": self.mint("zd"),
            "token_type": "bearer",
            "scope": grant.scope,
            "refresh_token": grant.refresh_token,
            "expires_in": 172800,
            "refresh_token_expires_in": 7776000,
        }
