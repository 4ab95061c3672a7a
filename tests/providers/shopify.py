"""Shopify, from shopify.dev: "Authorization code grant", "About offline access tokens" and the
changelog "Offline access tokens now support expiry and refresh".

Quirks: every URL is on the merchant's own host, ``https://{shop}.myshopify.com/admin/oauth/...``
(here the shop is the first path segment of the loopback emulator, ``/{shop}/admin/oauth/...``);
scopes are comma-separated; the client id and secret go in the body; no PKCE; an offline token
expires (1 hour) and comes with a rotating refresh token only when the code grant carries
``expiring=1``; the callback carries ``shop``, ``hmac``, ``host`` and ``timestamp`` beside the
code and state; a bad code is 400 ``invalid_request``, a dead refresh token 400 ``invalid_grant``.
There is no RFC 7009 revocation endpoint (an app is uninstalled through the Admin API).
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode

from tests.providers.emulator import CLIENT_ID, Emulator, Grant, Request

_PATH = re.compile(r"^/([a-z0-9][a-z0-9-]{0,62})(/admin/oauth/(?:authorize|access_token))$")


class Shopify(Emulator):
    provider = "shopify"
    authorize_path = "/admin/oauth/authorize"
    token_path = "/admin/oauth/access_token"
    connection_params: ClassVar[dict[str, str]] = {"shop": "acme-store"}

    def start(self) -> Shopify:
        self.shops: dict[int, str] = {}  # grant -> the shop it was granted at
        super().start()
        return self

    def endpoints(self) -> dict[str, str]:
        return {
            "authorization_endpoint": self.base + "/{shop}" + self.authorize_path,
            "token_endpoint": self.base + "/{shop}" + self.token_path,
        }

    def authorization_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith(self.authorize_path)]

    def shop_of(self, request: Request) -> str | None:
        found = _PATH.match(request.path)
        return found.group(1) if found else None

    def route(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        found = _PATH.match(request.path)
        if found is None:
            return 404, {"Content-Type": "text/plain"}, b"Not Found"
        shop, path = found.groups()
        if request.method == "GET" and path == self.authorize_path:
            query = request.query
            code = self.mint("code")
            self.codes[code] = (query.get("emulated_user", ""), {**query, "shop": shop})
            callback = {
                "code": code,
                "state": query.get("state", ""),
                "shop": f"{shop}.myshopify.com",
                "hmac": "0" * 64,
                "host": "YWRtaW4uc2hvcGlmeS5jb20vc3RvcmUvYWNtZQ",
                "timestamp": "1700000000",
            }
            return 302, {"Location": f"{query['redirect_uri']}?{urlencode(callback)}"}, b""
        status, answer = self.token_for(shop, request)
        return status, {"Content-Type": "application/json"}, json.dumps(answer).encode()

    def token_for(self, shop: str, request: Request) -> tuple[int, dict[str, Any]]:
        if request.headers.get("content-type", "").startswith("application/json"):
            form = {k: str(v) for k, v in request.json().items()}
        else:
            form = dict(parse_qsl(request.body.decode()))
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.client_secret:
            return 400, {"error": "invalid_client", "error_description": "Oauth error invalid_client"}
        if "code_verifier" in form:
            return 400, {"error": "invalid_request", "error_description": "unknown parameter"}
        if form.get("grant_type") == "refresh_token":
            known = self.grants.get(form.get("refresh_token") or "")
            grant = self.use_refresh(form.get("refresh_token")) if self._shop_of(known) == shop else None
            if grant is None:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
            return 200, self._answer(grant)
        taken = self.take_code(form.get("code"))
        if taken is None or taken[1].get("shop") != shop:  # a code is only good at its own shop
            return 400, {
                "error": "invalid_request",
                "error_description": "The authorization code was not found or was already used",
            }
        user, query = taken
        grant = self.new_grant(user, query.get("scope", ""), refresh=form.get("expiring") == "1")
        self.shops[id(grant)] = shop
        return 200, self._answer(grant)

    def _shop_of(self, grant: Grant | None) -> str | None:
        return None if grant is None else self.shops.get(id(grant))

    def _answer(self, grant: Grant) -> dict[str, Any]:
        answer: dict[str, Any] = {"access_token": self.mint("shpat"), "scope": grant.scope}
        if grant.refresh_token:
            answer.update(
                expires_in=3600, refresh_token=grant.refresh_token, refresh_token_expires_in=7776000
            )
        return answer
