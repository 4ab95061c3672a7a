"""Microsoft Entra ID, from learn.microsoft.com "Microsoft identity platform and OAuth 2.0
authorization code flow".

Quirks covered here: the tenant sits in the path (the preset fixes it as ``common``); a refresh
token is issued only for the ``offline_access`` scope; refresh tokens are replaced on each use
(the broker must store the new one, and the old one is dead once used); a revoked grant is 400
``invalid_grant`` with an AADSTS description. ``MicrosoftTenant`` (below) serves one tenant's
endpoints for the ``microsoft-tenant`` preset, whose tenant is a connection param.

Client credentials, from "Microsoft identity platform application authentication certificate
credentials" and "Workload identity federation": besides a client secret, the token request may
carry ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and a
``client_assertion`` JWT, either signed with a key registered on the app (``client_keys``; its
``aud`` is the token endpoint, ``iss`` and ``sub`` the client id) or issued by a trusted external
identity provider (``federated``: issuer, subject, key; its ``aud`` is
``api://AzureADTokenExchange``). The signature is verified with the public key the test
generated at run time, and ``exp`` and ``nbf`` are checked. With ``accept_secret`` False the app
has no secret at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from tests.providers.emulator import CLIENT_ID, Emulator, Request

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
SKEW = 300  # Entra tolerates five minutes of clock skew


@dataclass
class Microsoft(Emulator):
    provider = "microsoft"
    authorize_path = "/common/oauth2/v2.0/authorize"
    token_path = "/common/oauth2/v2.0/token"

    accept_secret: bool = True
    client_keys: list[RSAKey | ECKey] = field(default_factory=list)
    # Certificate credentials, found by the x5t#S256 (or x5t) thumbprint of the assertion's header.
    client_certs: list[x509.Certificate] = field(default_factory=list)
    federated: list[tuple[str, str, RSAKey | ECKey]] = field(default_factory=list)
    #: (header, claims) of every client assertion that verified.
    assertions: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def _client_error(self, form: dict[str, str]) -> str | None:
        """Why the client is not authenticated (an AADSTS description), or None."""
        if form.get("client_id") != CLIENT_ID:
            return "AADSTS700016: Application not found in the directory."
        assertion = form.get("client_assertion")
        if assertion is None:
            if self.accept_secret and form.get("client_secret") == self.client_secret:
                return None
            return "AADSTS7000215: Invalid client secret."
        if "client_secret" in form:
            return "AADSTS90023: more than one client credential."
        if form.get("client_assertion_type") != JWT_BEARER:
            return "AADSTS7000216: client_assertion_type is missing or wrong."
        now = time.time()
        keys = list(self.client_keys)
        if self.client_certs:
            found = self._certificate_key(assertion)
            if found is None:
                return "AADSTS700027: The certificate with the thumbprint of the assertion was not found."
            keys.append(found)
        trusted = [(k, CLIENT_ID, CLIENT_ID, self.base + self.token_path) for k in keys]
        trusted += [(k, iss, sub, FEDERATED_AUDIENCE) for iss, sub, k in self.federated]
        for key, iss, sub, aud in trusted:
            try:
                token = jwt.decode(assertion, key, algorithms=["RS256", "ES256", "PS256"])
            except (JoseError, ValueError):
                continue
            claims = token.claims
            audience = claims.get("aud")
            audiences = audience if isinstance(audience, list) else [audience]
            if claims.get("iss") != iss or claims.get("sub") != sub or aud not in audiences:
                return "AADSTS700021: client assertion audience, issuer or subject is wrong."
            if not isinstance(claims.get("exp"), int) or claims["exp"] < now - SKEW:
                return "AADSTS700024: client assertion is not within its valid time range."
            if isinstance(claims.get("nbf"), int) and claims["nbf"] > now + SKEW:
                return "AADSTS700024: client assertion is not within its valid time range."
            self.assertions.append((dict(token.header), dict(claims)))
            return None
        return "AADSTS700027: Client assertion failed signature validation."

    def _certificate_key(self, assertion: str) -> RSAKey | ECKey | None:
        """The public key of the registered certificate the assertion's header names."""
        try:
            padded = assertion.split(".")[0] + "=="
            header = json.loads(base64.urlsafe_b64decode(padded[: len(padded) - len(padded) % 4]))
        except ValueError:
            return None
        for certificate in self.client_certs:
            der = certificate.public_bytes(serialization.Encoding.DER)
            prints = {
                "x5t#S256": base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode(),
                "x5t": base64.urlsafe_b64encode(hashlib.sha1(der).digest()).rstrip(b"=").decode(),
            }
            if any(header.get(name) == value for name, value in prints.items()):
                public = certificate.public_key()
                return (
                    RSAKey.import_key(public)
                    if isinstance(public, rsa.RSAPublicKey)
                    else ECKey.import_key(public)
                )
        return None

    def token(self, request: Request) -> tuple[int, dict[str, Any]]:
        form = request.form()
        if request.path != self.token_path:
            return 404, {"error": "invalid_request"}
        problem = self._client_error(form)
        if problem is not None:
            return 401, {"error": "invalid_client", "error_description": problem}
        if form.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            # "OAuth 2.0 On-Behalf-Of flow": the user's token as the assertion, a token for the
            # downstream API back (no refresh token is kept by the broker for OBO).
            if form.get("requested_token_use") != "on_behalf_of" or not form.get("assertion"):
                return 400, {"error": "invalid_request", "error_description": "AADSTS50027: bad OBO request"}
            return 200, {
                "token_type": "Bearer",
                "scope": form.get("scope", ""),
                "expires_in": 3599,
                "access_token": self.mint("eyJ0eXAi"),
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
