"""The broker's use cases: connect flow, refresh and resolve. No gRPC, no SQL here.

Store writes run in worker threads (``asyncio.to_thread``); the single-row read that a cached
Resolve needs runs inline because it takes microseconds and a thread hop would cost more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from broker import validation
from broker.clock import Clock
from broker.config import BrokerConfig, Mode, UpstreamConfig
from broker.errors import (
    DecryptionError,
    FlowNotFound,
    NotConnected,
    NotImplementedMode,
    PermissionDenied,
    ReconnectRequired,
    StoreError,
    TokenRequestRejected,
    UnknownUpstream,
    UpstreamUnavailable,
)
from broker.logs import fields, get_logger
from broker.models import (
    AuthorizationRequest,
    Credential,
    CredentialInfo,
    CredentialStatus,
    ObtainedVia,
    PendingFlow,
    ResolvedCredential,
    Secrets,
)
from broker.oauth import rfc6749, rfc7636
from broker.oauth.client import ClientCredentials, TokenEndpointClient
from broker.oauth.rfc6749 import TokenResponse
from broker.refresh_lock import refresh_lock
from broker.singleflight import SingleFlight
from broker.vault import CredentialVault


class BrokerService:
    """Obtains, stores, refreshes and hands out per-user credentials."""

    def __init__(
        self,
        config: BrokerConfig,
        vault: CredentialVault,
        tokens: TokenEndpointClient,
        clock: Clock,
        logger: logging.Logger | None = None,
    ) -> None:
        self._config = config
        self._vault = vault
        self._tokens = tokens
        self._clock = clock
        self._log = logger or get_logger()
        self._by_name = {u.name: u for u in config.upstreams}
        self._by_key = {u.key: u for u in config.upstreams}
        self._flights: SingleFlight[Credential] = SingleFlight()

    @property
    def flights(self) -> SingleFlight[Credential]:
        return self._flights

    # -- lookup --------------------------------------------------------------------------

    def _upstream(self, name: str) -> UpstreamConfig:
        found = self._by_name.get(validation.upstream(name))
        if found is None:
            raise UnknownUpstream(f"upstream {name!r} is not configured")
        return found

    def _oauth_connect(self, name: str) -> UpstreamConfig:
        upstream = self._upstream(name)
        if upstream.auth_broker.mode is not Mode.OAUTH_CONNECT:
            raise NotImplementedMode(
                f"upstream {name!r} uses mode {upstream.auth_broker.mode.value}, which this "
                "operation does not support in this version (only oauth_connect)"
            )
        return upstream

    @staticmethod
    def _client(upstream: UpstreamConfig) -> ClientCredentials:
        auth = upstream.auth_broker
        secret = auth.client_secret.get_secret_value() if auth.client_secret else None
        return ClientCredentials(auth.client_id, secret, auth.token_endpoint_auth_method)

    # -- connect flow --------------------------------------------------------------------

    async def build_authorization_url(self, user_id: str, upstream_name: str) -> AuthorizationRequest:
        """Start an authorization-code + PKCE flow (RFC 6749 section 4.1, RFC 7636)."""
        user = validation.user_id(user_id)
        upstream = self._oauth_connect(upstream_name)
        return await self._start_flow(user, upstream)

    async def _start_flow(self, user: str, upstream: UpstreamConfig) -> AuthorizationRequest:
        auth = upstream.auth_broker
        assert auth.authorization_endpoint and auth.client_id and auth.redirect_uri  # by config
        verifier, state = rfc7636.new_verifier(), rfc7636.new_state()
        now = self._clock.now()
        flow = PendingFlow(
            state_hash=rfc7636.state_hash(state),
            user_id=user,
            upstream_key=upstream.key,
            verifier=verifier,
            created_at=now,
            expires_at=now + self._config.flow_ttl_seconds,
        )
        await asyncio.to_thread(self._vault.add_flow, flow, self._config.max_pending_flows, now)
        params = [
            ("response_type", "code"),
            ("client_id", auth.client_id),
            ("redirect_uri", auth.redirect_uri),
            ("state", state),
            ("code_challenge", rfc7636.challenge_s256(verifier)),
            ("code_challenge_method", "S256"),
        ]
        if auth.scopes:
            params.append(("scope", " ".join(auth.scopes)))
        params += [("resource", r) for r in auth.resources()]
        url = rfc6749.authorization_url(auth.authorization_endpoint, params)
        self._log.info("connect flow started", extra=fields(user_id=user, upstream=upstream.name))
        return AuthorizationRequest(url, state, flow.expires_at)

    async def complete(self, state: str, code: str, user_id: str) -> CredentialInfo:
        """Finish a connect flow: check the state and the user, exchange the code, store."""
        validation.state(state)
        validation.code(code)
        user = validation.user_id(user_id)
        # Consumed on first use, whatever happens next.
        flow = await asyncio.to_thread(self._vault.take_flow, rfc7636.state_hash(state))
        if flow is None or flow.expires_at <= self._clock.now():
            raise FlowNotFound("the state is unknown, expired or already used; start a new flow")
        upstream = self._by_key.get(flow.upstream_key)
        if upstream is None:
            raise FlowNotFound("the flow's upstream is no longer configured; start a new flow")
        if flow.user_id != user:
            self._log.warning(
                "connect flow completed by another user; refused",
                extra=fields(user_id=user, upstream=upstream.name),
            )
            raise PermissionDenied("this connect flow was started by a different user")
        auth = upstream.auth_broker
        assert auth.redirect_uri is not None
        form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", auth.redirect_uri),
            ("code_verifier", flow.verifier),
        ]
        form += [("resource", r) for r in auth.resources()]
        token = await self._request(upstream, form, user)
        now = self._clock.now()
        credential = self._credential(user, upstream, token, ObtainedVia.CONNECT_FLOW, None, now)
        await asyncio.to_thread(self._vault.save, credential, None, now)
        self._log.info("connected", extra=fields(user_id=user, upstream=upstream.name))
        return self._info(credential, upstream)

    async def deny(self, state: str, error: str, error_description: str) -> None:
        """The user refused (or the server failed) the authorization: drop the flow."""
        validation.state(state)
        code = validation.oauth_error(error)
        validation.error_description(error_description)  # checked, never logged or stored
        flow = await asyncio.to_thread(self._vault.take_flow, rfc7636.state_hash(state))
        if flow is not None:
            upstream = self._by_key.get(flow.upstream_key)
            self._log.info(
                "connect flow denied",
                extra=fields(
                    user_id=flow.user_id,
                    upstream=upstream.name if upstream else None,
                    error=code if code in rfc6749.ALLOWED_AUTHORIZE_ERROR_CODES else "other",
                ),
            )

    # -- refresh and resolve -------------------------------------------------------------

    async def refresh(self, user_id: str, upstream_name: str) -> CredentialInfo:
        """Refresh now, whatever the expiry (RFC 6749 section 6)."""
        user = validation.user_id(user_id)
        upstream = self._oauth_connect(upstream_name)
        credential = await self._flights.run(
            (user, upstream.key), lambda: self._refresh_exclusive(user, upstream, None)
        )
        return self._info(credential, upstream)

    async def resolve(
        self, user_id: str, upstream_name: str, subject_token: str, min_valid_seconds: int
    ) -> ResolvedCredential:
        """A valid access token for (user, upstream), refreshed first when it is about to expire."""
        user = validation.user_id(user_id)
        upstream = self._upstream(upstream_name)
        validation.subject_token(subject_token)
        floor = validation.min_valid_seconds(min_valid_seconds)
        window = max(self._config.refresh_window_seconds, floor)
        if upstream.auth_broker.mode is not Mode.OAUTH_CONNECT:
            raise NotImplementedMode(
                f"upstream {upstream.name!r} uses mode {upstream.auth_broker.mode.value}, "
                "which this version does not implement yet"
            )
        credential = self._load(user, upstream)
        if credential is None:
            raise await self._connect_error(NotConnected, user, upstream)
        if not credential.valid_for(self._clock.now(), window):
            if credential.status is CredentialStatus.NEEDS_REAUTH or not credential.secrets.refresh_token:
                raise await self._connect_error(ReconnectRequired, user, upstream)
            try:
                credential = await self._flights.run(
                    (user, upstream.key), lambda: self._refresh_exclusive(user, upstream, window)
                )
            except UpstreamUnavailable:
                # The authorization server is down: a token still valid for what the caller
                # asked is better than an error.
                if not credential.valid_for(self._clock.now(), floor):
                    raise
        return self._resolved(credential, upstream)

    def _load(self, user: str, upstream: UpstreamConfig) -> Credential | None:
        try:
            found = self._vault.get(user, upstream.key)
        except DecryptionError:
            self._log.error(
                "stored credential failed to decrypt",
                extra=fields(user_id=user, upstream=upstream.name),
            )
            return Credential(
                user, upstream.key, Secrets(""), "", (), 0.0, "", 0.0, CredentialStatus.NEEDS_REAUTH
            )
        return None if found is None else found[0]

    async def _refresh_exclusive(self, user: str, upstream: UpstreamConfig, window: int | None) -> Credential:
        """``_refresh`` under the store's cross-process lock for (user, upstream).

        Another process refreshing the same credential holds the lock: we wait (bounded), then
        ``_refresh`` re-reads the row and finds the fresh credential, so the same refresh token is
        never presented twice. A waiter that times out re-checks for a fresh credential first."""
        timeout = self._config.store.lock_timeout_seconds
        async with refresh_lock(self._vault.store, user, upstream.key, timeout) as held:
            if held:
                return await self._refresh(user, upstream, window)
        fresh = self._load(user, upstream)
        if fresh is not None and window is not None and fresh.valid_for(self._clock.now(), window):
            return fresh
        self._log.warning(
            "timed out waiting for another process's refresh",
            extra=fields(user_id=user, upstream=upstream.name),
        )
        raise StoreError("timed out waiting for another process to refresh this credential; retry")

    async def _refresh(self, user: str, upstream: UpstreamConfig, window: int | None) -> Credential:
        """One refresh_token grant, inside the single flight for (user, upstream).

        ``window`` None forces the refresh; otherwise a credential that another caller already
        refreshed (still valid for ``window``) is returned as is."""
        credential = self._load(user, upstream)
        if credential is None:
            raise await self._connect_error(NotConnected, user, upstream)
        if window is not None and credential.valid_for(self._clock.now(), window):
            return credential
        refresh_token = credential.secrets.refresh_token
        if credential.status is CredentialStatus.NEEDS_REAUTH or not refresh_token:
            raise await self._connect_error(ReconnectRequired, user, upstream)
        auth = upstream.auth_broker
        form = [("grant_type", "refresh_token"), ("refresh_token", refresh_token)]
        if auth.scopes:
            form.append(("scope", " ".join(auth.scopes)))
        form += [("resource", r) for r in auth.resources()]
        try:
            token = await self._request(upstream, form, user)
        except TokenRequestRejected as exc:
            if exc.oauth_error in ("invalid_grant", "invalid_client"):
                await asyncio.to_thread(
                    self._vault.store.record_failure,
                    user,
                    upstream.key,
                    CredentialStatus.NEEDS_REAUTH.value,
                    exc.oauth_error,
                    credential.generation,
                )
                self._log.warning(
                    "refresh refused; reconnect required",
                    extra=fields(user_id=user, upstream=upstream.name, error=exc.oauth_error),
                )
                raise await self._connect_error(ReconnectRequired, user, upstream) from None
            raise
        now = self._clock.now()
        # A response without a refresh token keeps the old one (RFC 6749 section 6); the new
        # access token and a rotated refresh token are written together, in one row.
        renewed = self._credential(user, upstream, token, credential.obtained_via, credential, now)
        generation = await asyncio.to_thread(self._vault.save, renewed, credential.generation, now)
        if generation is None:
            # Another process refreshed first: use its result.
            winner = self._load(user, upstream)
            if winner is None:
                raise await self._connect_error(NotConnected, user, upstream)
            return winner
        self._log.info("refreshed", extra=fields(user_id=user, upstream=upstream.name))
        return Credential(
            renewed.user_id,
            renewed.upstream_key,
            renewed.secrets,
            renewed.token_type,
            renewed.scopes,
            renewed.expires_at,
            renewed.obtained_via,
            renewed.updated_at,
            renewed.status,
            generation,
        )

    async def _request(
        self, upstream: UpstreamConfig, form: Sequence[tuple[str, str]], user: str
    ) -> TokenResponse:
        try:
            return await self._tokens.request_token(
                upstream.auth_broker.token_endpoint, form, self._client(upstream)
            )
        except (TokenRequestRejected, UpstreamUnavailable) as exc:
            self._log.warning(
                "token request failed",
                extra=fields(user_id=user, upstream=upstream.name, error=exc.code, detail=exc.message),
            )
            raise

    async def _connect_error(
        self,
        kind: type[NotConnected] | type[ReconnectRequired],
        user: str,
        upstream: UpstreamConfig,
    ) -> NotConnected | ReconnectRequired:
        request = await self._start_flow(user, upstream)
        if kind is NotConnected:
            text = f"user has not connected upstream {upstream.name!r}; send them to the authorization_url"
        else:
            text = (
                f"the credential for upstream {upstream.name!r} can no longer be refreshed; "
                "send the user to the authorization_url to reconnect"
            )
        return kind(text, upstream=upstream.name, authorization_url=request.authorization_url)

    # -- mapping -------------------------------------------------------------------------

    def _credential(
        self,
        user: str,
        upstream: UpstreamConfig,
        token: TokenResponse,
        obtained_via: str,
        previous: Credential | None,
        now: float,
    ) -> Credential:
        refresh = token.refresh_token or (previous.secrets.refresh_token if previous else None)
        if token.scope is not None:
            scopes = token.scope
        elif previous is not None:
            scopes = previous.scopes
        else:
            scopes = upstream.auth_broker.scopes
        return Credential(
            user_id=user,
            upstream_key=upstream.key,
            secrets=Secrets(token.access_token, refresh),
            token_type=token.token_type,
            scopes=scopes,
            expires_at=None if token.expires_in is None else now + token.expires_in,
            obtained_via=obtained_via,
            updated_at=now,
        )

    @staticmethod
    def _info(credential: Credential, upstream: UpstreamConfig) -> CredentialInfo:
        return CredentialInfo(
            user_id=credential.user_id,
            upstream=upstream.name,
            token_type=credential.token_type,
            scopes=credential.scopes,
            expires_at=credential.expires_at,
            obtained_via=credential.obtained_via,
            updated_at=credential.updated_at,
        )

    @staticmethod
    def _resolved(credential: Credential, upstream: UpstreamConfig) -> ResolvedCredential:
        auth = upstream.auth_broker
        token = credential.secrets.access_token
        return ResolvedCredential(
            access_token=token,
            token_type=credential.token_type,
            expires_at=credential.expires_at,
            scopes=credential.scopes,
            obtained_via=credential.obtained_via,
            header_name=auth.header,
            header_value=auth.header_format.replace("{token}", token),
        )
