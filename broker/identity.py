"""Verified user identity: the user's own JWT, checked against the identity provider's keys.

When the config has an ``identity:`` block, every RPC that acts for a user carries that user's
token (the request's ``subject_token`` or ``authorization: Bearer`` metadata). The token's
signature (RFC 7515), issuer, audience, expiry and not-before (RFC 7519 section 4.1) are checked
with joserfc; the user is the configured claim. Keys come from the JWKS (RFC 7517) at the
configured URI or the one the issuer's OpenID Connect discovery document names; they are
fetched once, cached, and refetched on an unknown key id at most once per interval
(``jwks_min_refetch_seconds``) after a fetch that worked.

An outage of the identity provider is not a bad token: a failed fetch is retried after 1 s,
then 2, 4, ... up to that interval, and until a fetch works again a token whose key is not in
the cache is answered IDENTITY_PROVIDER_UNAVAILABLE, never USER_TOKEN_INVALID. Keys already
cached keep verifying tokens throughout.

Only asymmetric algorithms from the configured list are accepted; ``none`` and the HMAC family
never are, and the key's type must fit the algorithm, so a public key can't be used as an HMAC
secret. Errors say what is wrong in a stable word (``problem``) and never echo the token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from joserfc import jws, jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import Key, KeySet

from broker import validation
from broker.clock import Clock
from broker.config import IdentityConfig, _check_url
from broker.errors import IdentityProviderUnavailable, UserMismatch, UserTokenInvalid
from broker.logs import fields, get_logger
from broker.oauth.tls import certificate_problem, untrusted
from broker.tracing import NO_SPANS, CallRecord, Spans

# RFC 7518 section 3.1 / RFC 8037 section 3.1: which key type each algorithm signs with.
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
MAX_DOCUMENT_BYTES = 256 * 1024
#: The wait before retrying the first failed key fetch; it doubles on each further failure,
#: up to ``jwks_min_refetch_seconds``.
FETCH_RETRY_FIRST_SECONDS = 1.0


def fetch_retry_seconds(consecutive_failures: int, ceiling: float) -> float:
    """How long to wait after the n-th failed fetch in a row: 1, 2, 4, ... s, at most ``ceiling``."""
    n = max(1, consecutive_failures)
    return min(ceiling, FETCH_RETRY_FIRST_SECONDS * float(1 << min(n - 1, 30)))


@dataclass(slots=True)  # not frozen: built on every call, and frozen costs more
class VerifiedUser:
    """Who a request acts for, and how we know.

    ``claims`` is None when no identity is configured (the caller is trusted to name the
    user). ``token`` is the user's token, for a token exchange; never logged."""

    user_id: str
    claims: Mapping[str, Any] | None
    token: str

    def __repr__(self) -> str:
        return f"VerifiedUser(user_id={self.user_id!r}, verified={self.claims is not None})"


def bearer_token(authorization: str | None) -> str:
    """The token of an ``authorization: Bearer <token>`` value (RFC 6750 section 2.1), or ''."""
    if not authorization:
        return ""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class IdentityVerifier:
    """Verifies user JWTs against one issuer's keys."""

    def __init__(
        self,
        config: IdentityConfig,
        clock: Clock,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        logger: logging.Logger | None = None,
        spans: Spans = NO_SPANS,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._config = config
        self._spans = spans
        self._clock = clock
        self._log = logger or get_logger()
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            transport=transport,
            verify=verify,  # the outbound SSL context (broker/oauth/tls.py; http.ca_file)
            follow_redirects=False,
            trust_env=False,
            headers={"Accept": "application/json"},
        )
        self._keys: KeySet | None = None
        # When keys were last fetched successfully; the failures since, and when to retry.
        self._fetched_at: float | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._jwks_uri = config.jwks_uri
        self._lock = asyncio.Lock()
        #: JWKS documents fetched so far (for tests and metrics).
        self.fetches = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- verification --------------------------------------------------------------------

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, once every check passed. Raises UserTokenInvalid."""
        if not token:
            raise UserTokenInvalid("missing", "required (subject_token or authorization: Bearer metadata)")
        validation.subject_token(token)
        try:
            header = jws.extract_compact(token.encode("ascii")).headers()
        except (JoseError, ValueError, UnicodeError):
            raise UserTokenInvalid("malformed", "not a signed JWT (JWS compact serialization)") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            shown = alg if isinstance(alg, str) and alg.isalnum() and len(alg) <= 16 else "?"
            raise UserTokenInvalid("algorithm", f"algorithm {shown} is not allowed")
        if "jku" in header or "x5u" in header or "jwk" in header:
            # Keys named by the token itself are never trusted (RFC 8725 section 3.10).
            raise UserTokenInvalid("header", "the token names its own key; only the issuer's JWKS is used")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise UserTokenInvalid("header", "kid is not a string")
        key = await self._key(kid, alg)
        try:
            decoded = jwt.decode(token, key, algorithms=[alg])
        except BadSignatureError:
            raise UserTokenInvalid("signature", "the signature does not verify") from None
        except JoseError:
            raise UserTokenInvalid(
                "signature", "the token could not be verified with the issuer's key"
            ) from None
        claims = dict(decoded.claims)
        self._check_claims(claims)
        return claims

    def _check_claims(self, claims: dict[str, Any]) -> None:
        config = self._config
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock.now()),
            leeway=config.leeway_seconds,
            iss={"essential": True, "value": config.issuer},
            aud={"essential": True, "values": list(config.audiences)},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise UserTokenInvalid("expired", "the token has expired") from None
        except MissingClaimError as exc:
            raise UserTokenInvalid("claims", f"missing claim(s) {exc.description}") from None
        except InvalidClaimError as exc:
            name = exc.claim
            problems = {"iss": "issuer", "aud": "audience", "nbf": "not_yet_valid", "iat": "not_yet_valid"}
            problem = problems.get(name, "claims")
            text = {
                "issuer": "the issuer is not the trusted one",
                "audience": "the token is not meant for this broker (audience)",
                "not_yet_valid": "the token is not valid yet",
            }.get(problem, f"claim {name} is not valid")
            raise UserTokenInvalid(problem, text) from None
        except JoseError:
            raise UserTokenInvalid("claims", "the token's claims are not valid") from None

    def user_of(self, claims: Mapping[str, Any]) -> str:
        """The user a verified token names, by the configured claim."""
        value = claims.get(self._config.user_claim)
        if not isinstance(value, str) or not value:
            raise UserTokenInvalid("claims", f"claim {self._config.user_claim} is missing or not a string")
        try:
            return validation.user_id(value)
        except Exception:
            raise UserTokenInvalid(
                "claims", f"claim {self._config.user_claim} is not a usable user id"
            ) from None

    # -- keys ----------------------------------------------------------------------------

    async def _key(self, kid: str | None, alg: str) -> Key:
        key = self._find(kid, alg)
        if key is not None:
            return key
        async with self._lock:
            key = self._find(kid, alg)  # another request may have refetched meanwhile
            if key is not None:
                return key
            now = self._clock.now()
            if self._failures:
                # The last fetch failed: the provider is (or was) down. Whether this key id
                # exists cannot be known until a fetch works, so the answer is "unavailable".
                if now < self._retry_at:
                    raise IdentityProviderUnavailable(
                        "the identity provider's keys could not be fetched; retrying in "
                        f"{self._retry_at - now:.0f} s"
                    )
                due = True
            else:
                interval = self._config.jwks_min_refetch_seconds
                due = self._fetched_at is None or now - self._fetched_at >= interval
            if due:
                await self._fetch_or_back_off(now)
                key = self._find(kid, alg)
        if key is None:
            raise UserTokenInvalid("unknown_key", "the token's key id is not among the issuer's keys")
        return key

    def _find(self, kid: str | None, alg: str) -> Key | None:
        if self._keys is None:
            return None
        wanted = _KEY_TYPE.get(alg[:2])
        candidates = [
            k
            for k in self._keys.keys
            if (kid is None or k.kid == kid)
            and k.key_type == wanted
            and k.get("use", "sig") == "sig"
            and k.get("alg", alg) == alg
        ]
        if kid is None and len(candidates) != 1:
            return None  # without a kid, only an unambiguous single key is used
        return candidates[0] if candidates else None

    async def _fetch_or_back_off(self, now: float) -> None:
        """Fetch the keys; on failure, schedule the retry (1 s, doubling up to the refetch
        interval) and raise IdentityProviderUnavailable."""
        try:
            await self._fetch()
        except IdentityProviderUnavailable as exc:
            self._failures += 1
            wait = fetch_retry_seconds(self._failures, float(self._config.jwks_min_refetch_seconds))
            self._retry_at = now + wait
            self._log.warning(
                "identity provider keys could not be fetched; will retry",
                extra=fields(failures=self._failures, retry_in_seconds=wait, detail=exc.message),
            )
            raise
        self._fetched_at = now
        self._failures = 0

    async def _fetch(self) -> None:
        self.fetches += 1
        if self._jwks_uri is None:
            self._jwks_uri = await self._discover()
        document = await self._get_json(self._jwks_uri, "JWKS")
        raw = document.get("keys")
        if not isinstance(raw, list):
            raise IdentityProviderUnavailable("the identity provider's JWKS has no keys list")
        keys: list[Key] = []
        for entry in raw:
            if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
                continue  # symmetric or unknown keys are never used for user tokens
            try:
                key = KeySet.import_key_set({"keys": [entry]}).keys[0]
            except (JoseError, ValueError, TypeError):
                continue
            if key.is_private:
                continue
            keys.append(key)
        self._keys = KeySet(keys)
        self._log.info("identity provider keys fetched", extra=fields(keys=len(keys)))

    async def _discover(self) -> str:
        # OpenID Connect Discovery 1.0 section 4: the metadata lives under the issuer.
        url = self._config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json(url, "discovery document")
        if document.get("issuer") != self._config.issuer:
            # Section 4.3: the issuer in the document must be the one asked about.
            raise IdentityProviderUnavailable(
                "the identity provider's discovery document names another issuer"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise IdentityProviderUnavailable("the identity provider's discovery document has no jwks_uri")
        try:
            _check_url(jwks_uri)
        except ValueError:
            raise IdentityProviderUnavailable(
                "the identity provider's jwks_uri must use https (plain http only on loopback)"
            ) from None
        return jwks_uri

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        with self._spans.http("jwks" if what == "JWKS" else "discovery", "GET", url) as span:
            return await self._fetch_json(url, what, span)

    async def _fetch_json(self, url: str, what: str, span: CallRecord) -> dict[str, Any]:
        # The timeout bounds the fetch as a whole (connect, headers and every byte of the body),
        # not only each read: a provider that drips its document a byte at a time is cut at the
        # deadline instead of holding every RPC that waits for the keys.
        try:
            async with asyncio.timeout(self._timeout), self._http.stream("GET", url) as resp:
                span.status(resp.status_code)
                if resp.status_code != 200:
                    raise IdentityProviderUnavailable(
                        f"the identity provider's {what} answered HTTP {resp.status_code}"
                    )
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise IdentityProviderUnavailable(f"the identity provider's {what} is too large")
        except (TimeoutError, httpx.TimeoutException):
            raise IdentityProviderUnavailable(f"fetching the identity provider's {what} timed out") from None
        except httpx.HTTPError as exc:
            problem = certificate_problem(exc)
            if problem is not None:
                raise IdentityProviderUnavailable(
                    untrusted(f"the identity provider's {what} server", problem)
                ) from None
            raise IdentityProviderUnavailable(f"could not fetch the identity provider's {what}") from None
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise IdentityProviderUnavailable(f"the identity provider's {what} is not JSON") from None
        if not isinstance(document, dict):
            raise IdentityProviderUnavailable(f"the identity provider's {what} is not a JSON object")
        return document


class UserAuthenticator:
    """The hook the servicer calls for every RPC that acts for a user.

    Without a verifier the caller is trusted to name the user; the request's subject token is
    passed on as is. With one, the request must carry the user's token, and ``user_id`` must
    be the user that token names."""

    def __init__(self, verifier: IdentityVerifier | None = None) -> None:
        self.verifier = verifier

    async def authenticate(self, user_id: str, subject_token: str, authorization: str | None) -> VerifiedUser:
        if self.verifier is None:
            return VerifiedUser(user_id, None, subject_token)
        validation.user_id(user_id)
        token = subject_token or bearer_token(authorization)
        claims = await self.verifier.verify(token)
        verified = self.verifier.user_of(claims)
        if verified != user_id:
            raise UserMismatch("user_id: names a different user than the verified user token")
        return VerifiedUser(verified, claims, token)
