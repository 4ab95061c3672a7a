"""Credentials obtained from the user's own token: RFC 8693 token exchange and Entra on-behalf-of.

The result is cached per (user, upstream) in the credentials table, sealed like any other
credential, with ``obtained_via`` set to the mode and no refresh token; it is served from there
until it enters the refresh window. Concurrent callers share one exchange (single flight), a
failed exchange is never retried within the same call and is never cached. The subject token is
only ever put in the request body: it is not logged, stored, or put in an error.

Long-running on-behalf-of (``store_refresh_token: true``): the refresh token the exchange
returns is kept, sealed with the access token, and renews the credential (through ``renew``: the
service's refresh, with its single flight, refresh lease and backoff) when it enters the
refresh window and no subject token came, or the subject token was refused (expired): a
background agent keeps working after the user's own token is gone. A fresh subject token still
means a fresh exchange. When the stored grant is dead too, the answer is SUBJECT_TOKEN_REQUIRED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from broker import lifecycle
from broker.audit import Auditor
from broker.clock import Clock
from broker.config import Mode, UpstreamConfig
from broker.errors import (
    ConnectRequired,
    DecryptionError,
    SubjectTokenRequired,
    TokenRequestRejected,
    UpstreamUnavailable,
)
from broker.logs import fields, get_logger
from broker.models import Credential, CredentialStatus, ObtainedVia, Secrets
from broker.oauth import client_auth, rfc8693
from broker.oauth.client import TokenEndpointClient
from broker.oauth.rfc6749 import TokenResponse
from broker.singleflight import SingleFlight
from broker.vault import CredentialVault

_OBTAINED_VIA = {Mode.TOKEN_EXCHANGE: ObtainedVia.TOKEN_EXCHANGE, Mode.ENTRA_OBO: ObtainedVia.ENTRA_OBO}


class TokenExchanger:
    """Resolves credentials for ``token_exchange`` and ``entra_obo`` upstreams."""

    def __init__(
        self,
        vault: CredentialVault,
        tokens: TokenEndpointClient,
        clock: Clock,
        logger: logging.Logger | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self._vault = vault
        self._audit = auditor or Auditor()
        self._tokens = tokens
        self._clock = clock
        self._log = logger or get_logger()
        self.flights: SingleFlight[Credential] = SingleFlight()
        #: Exchanges actually sent to a token endpoint (for tests and metrics).
        self.exchanges = 0
        #: Renews a stored credential with its refresh token (set by the service): for
        #: upstreams with ``store_refresh_token``.
        self.renew: Callable[[str, UpstreamConfig, int], Awaitable[Credential]] | None = None

    async def resolve(
        self, user: str, upstream: UpstreamConfig, subject_token: str, floor: int, window: int
    ) -> Credential:
        """A credential valid for ``window`` seconds if one can be had; one valid for ``floor``
        (the caller's own minimum) when no new exchange is possible."""
        mode = upstream.auth_broker.mode
        cached = await self._read(user, upstream, recent=True)
        now = self._clock.now()
        if cached is not None and cached.valid_for(now, window):
            return cached
        renewable = (
            upstream.auth_broker.store_refresh_token
            and cached is not None
            and bool(cached.secrets.refresh_token)
            and self.renew is not None
        )
        if not subject_token:
            if renewable:
                return await self._renew(user, upstream, cached, floor, window)
            if cached is not None and cached.valid_for(now, floor):
                return cached
            raise SubjectTokenRequired(
                f"subject_token: required for upstream {upstream.name!r} (mode {mode.value}): "
                "there is no cached credential valid long enough; send the user's token"
            )
        try:
            return await self.flights.run(
                (user, upstream.key), lambda: self._exchange(user, upstream, subject_token, window)
            )
        except TokenRequestRejected as exc:
            if rate_limited(exc):
                # Not a refusal of the user's token: the server asks to come back later. A
                # token still valid for what the caller asked is better than an error, and the
                # stored grant is not sent to a server that just said "slow down".
                if cached is not None and cached.valid_for(self._clock.now(), floor):
                    return cached
                raise
            if not renewable:
                raise
            # The user's token was refused (typically: it expired); the stored grant still serves.
            return await self._renew(user, upstream, cached, floor, window)
        except UpstreamUnavailable:
            # The authorization server is down: a token still valid for what the caller asked
            # for is better than an error.
            if cached is not None and cached.valid_for(self._clock.now(), floor):
                return cached
            raise

    async def _renew(
        self, user: str, upstream: UpstreamConfig, cached: Credential | None, floor: int, window: int
    ) -> Credential:
        """Renew with the stored refresh token; the cached credential when the authorization
        server is down and it is still valid for ``floor``."""
        assert self.renew is not None
        try:
            return await self.renew(user, upstream, window)
        except (UpstreamUnavailable, TokenRequestRejected) as exc:
            if isinstance(exc, TokenRequestRejected) and lifecycle.is_terminal(exc):
                raise renewal_refused(upstream) from None
            # Down, or a refusal that does not end the grant (rate limited, invalid_scope, a 4xx
            # without a code; the refresh recorded it and backs off): the grant still stands, so
            # this is not SUBJECT_TOKEN_REQUIRED. A token still valid for ``floor`` serves.
            if cached is not None and cached.valid_for(self._clock.now(), floor):
                return cached
            raise
        except ConnectRequired:
            # The refresh found the grant dead (invalid_grant, a reconnect error, no refresh token).
            raise renewal_refused(upstream) from None

    async def _read(self, user: str, upstream: UpstreamConfig, recent: bool = False) -> Credential | None:
        """:meth:`_load`, in a worker thread when the store's reads may wait (PostgreSQL) and
        the read cache cannot answer (``vault.must_wait``)."""
        if self._vault.must_wait(user, upstream.key, recent):
            return await asyncio.to_thread(self._load, user, upstream, recent)
        return self._load(user, upstream, recent)

    def _load(self, user: str, upstream: UpstreamConfig, recent: bool = False) -> Credential | None:
        try:
            found = self._vault.get(user, upstream.key, recent=recent)
        except DecryptionError:
            self._log.error(
                "stored credential failed to decrypt; it will be replaced by a new exchange",
                extra=fields(user_id=user, upstream=upstream.name),
            )
            return None
        if found is None:
            return None
        credential = found[0]
        # A row from another mode (the upstream's mode changed) is never served.
        if credential.obtained_via != _OBTAINED_VIA[upstream.auth_broker.mode].value:
            return None
        if credential.status is CredentialStatus.NEEDS_REAUTH:
            return None
        if (
            credential.status is not CredentialStatus.CONNECTED
            and not upstream.auth_broker.store_refresh_token
        ):
            return None
        return credential

    async def _exchange(
        self, user: str, upstream: UpstreamConfig, subject_token: str, window: int
    ) -> Credential:
        """One exchange, inside the single flight for (user, upstream)."""
        # Another caller (or replica) may have just stored a fresh one.
        cached = await self._read(user, upstream)
        if cached is not None and cached.valid_for(self._clock.now(), window):
            return cached
        auth = upstream.auth_broker
        if auth.mode is Mode.ENTRA_OBO:
            form = rfc8693.entra_obo_form(assertion=subject_token, scopes=auth.scopes)
        else:
            form = rfc8693.token_exchange_form(
                subject_token=subject_token,
                subject_token_type=auth.subject_token_type,
                requested_token_type=auth.requested_token_type,
                audiences=auth.audiences(),
                resources=auth.resources(),
                scopes=auth.scopes,
            )
        client = client_auth.client_credentials(upstream)
        assert auth.token_endpoint is not None  # set in config or by discovery at start-up
        self.exchanges += 1
        try:
            token = await self._tokens.request_token(
                auth.token_endpoint, form, client, upstream=upstream.name, parse=rfc8693.parse_answer
            )
            if auth.mode is Mode.TOKEN_EXCHANGE:
                rfc8693.check_issued_token_type(token, auth.requested_token_type)
        except (TokenRequestRejected, UpstreamUnavailable) as exc:
            # exc.message holds only the HTTP status and an allow-listed OAuth error code.
            self._log.warning(
                "token exchange failed",
                extra=fields(
                    user_id=user,
                    upstream=upstream.name,
                    mode=auth.mode.value,
                    error=exc.code,
                    detail=exc.message,
                ),
            )
            self._audit.record("exchange", "failure", user=user, upstream=upstream.name, reason=exc.code)
            raise
        now = self._clock.now()
        credential = self._credential(user, upstream, token, now)
        generation = await asyncio.to_thread(self._vault.save, credential, None, now)
        self._log.info(
            "token exchanged", extra=fields(user_id=user, upstream=upstream.name, mode=auth.mode.value)
        )
        self._audit.record("exchange", "success", user=user, upstream=upstream.name)
        return Credential(
            credential.user_id,
            credential.upstream_key,
            credential.secrets,
            credential.token_type,
            credential.scopes,
            credential.expires_at,
            credential.obtained_via,
            credential.updated_at,
            credential.status,
            generation or 0,
        )

    @staticmethod
    def _credential(user: str, upstream: UpstreamConfig, token: TokenResponse, now: float) -> Credential:
        auth = upstream.auth_broker
        return Credential(
            user_id=user,
            upstream_key=upstream.key,
            # Renewed by exchanging again, unless the upstream keeps the exchange's refresh token.
            secrets=Secrets(token.access_token, token.refresh_token if auth.store_refresh_token else None),
            token_type=token.token_type,
            scopes=token.scope if token.scope is not None else auth.scopes,
            expires_at=None if token.expires_in is None else now + token.expires_in,
            obtained_via=_OBTAINED_VIA[auth.mode].value,
            updated_at=now,
        )


def rate_limited(exc: TokenRequestRejected) -> bool:
    """HTTP 429 (RFC 6585 section 4): too many requests for now. Neither the token presented nor
    the grant was refused."""
    return exc.status == HTTPStatus.TOO_MANY_REQUESTS


def renewal_refused(upstream: UpstreamConfig) -> SubjectTokenRequired:
    """The answer when a long-running credential's stored grant is dead (or there is none): the
    user's own token is needed for a new exchange."""
    return SubjectTokenRequired(
        f"subject_token: required for upstream {upstream.name!r} (mode "
        f"{upstream.auth_broker.mode.value}): the stored grant can no longer be renewed; "
        "send the user's token"
    )
