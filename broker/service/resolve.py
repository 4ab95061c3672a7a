"""The resolve use case: a valid access token for (user, upstream), refreshed or exchanged
first when it is about to expire, or the error that says how to connect. Performance-tuned:
the single-row read a cached Resolve needs runs inline on SQLite (a thread hop would cost more
than the read; on PostgreSQL it goes to a worker thread unless the read cache answers), and the
answer is built positionally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from broker import exchange, lifecycle, rejected_token, scopes, validation
from broker.config import Mode, UpstreamConfig
from broker.errors import (
    DecryptionError,
    InvalidArgument,
    NotConnected,
    ReconnectRequired,
    SubjectTokenRequired,
    TokenRequestRejected,
    UpstreamUnavailable,
)
from broker.logs import fields
from broker.models import Credential, CredentialStatus, ResolvedCredential, Secrets
from broker.policy import PolicyRequest
from broker.service.base import ServiceBase


class ResolveService(ServiceBase):
    """Answers Resolve."""

    async def resolve(
        self,
        user_id: str,
        upstream_name: str,
        subject_token: str,
        min_valid_seconds: int,
        claims: Mapping[str, Any] | None = None,
        rejected_access_token: str = "",
        required_scopes: Sequence[str] = (),
    ) -> ResolvedCredential:
        """A valid access token for (user, upstream), refreshed (or exchanged) first when it is
        about to expire, once the policy allowed it. ``claims``: the verified user token's.
        ``rejected_access_token``: the upstream refused this token; when it is the stored one,
        refresh first (see broker/rejected_token.py). ``required_scopes``: scopes the stored
        grant must hold (broker/scopes.py)."""
        user = validation.user_id(user_id)
        upstream = self._upstream(upstream_name)
        validation.subject_token(subject_token)
        floor = validation.min_valid_seconds(min_valid_seconds)
        required: tuple[str, ...] = ()
        if required_scopes:
            required = scopes.check_required(required_scopes, upstream.auth_broker.scope_separator)
            if upstream.auth_broker.mode is not Mode.OAUTH_CONNECT:
                raise InvalidArgument(
                    f"required_scopes: upstream {upstream.name!r} uses mode "
                    f"{upstream.auth_broker.mode.value}, whose scopes are configured, not asked for"
                )
        window = max(self._config.refresh_window_seconds, floor)
        if not self._policy.allows_all:
            await self._policy.check(
                PolicyRequest(user, upstream.name, upstream.auth_broker.mode.value, claims)
            )
        if upstream.auth_broker.mode is not Mode.OAUTH_CONNECT:
            exchanged = await self._exchanger.resolve(user, upstream, subject_token, floor, window)
            return self._resolved(exchanged, upstream)
        credential = await self._read(user, upstream, recent=True)
        if credential is None:
            raise await self._connect_error(NotConnected, user, upstream, required)
        if required:
            await self._check_scopes(user, upstream, credential, required)
        if rejected_access_token and rejected_token.is_stored_token(
            rejected_access_token, credential.secrets.access_token
        ):
            credential = await self._refresh_rejected(user, upstream, credential, rejected_access_token)
        if not credential.valid_for(self._clock.now(), window):
            if credential.status is CredentialStatus.NEEDS_REAUTH or not credential.secrets.refresh_token:
                raise await self._connect_error(ReconnectRequired, user, upstream)
            if self._refreshed_recently(credential, self._clock.now()):
                self.usage.used(user, upstream.key, self._clock.now())
                return self._resolved(credential, upstream)
            try:
                credential = await self._flights.run(
                    (user, upstream.key), lambda: self._audited_refresh(user, upstream, window)
                )
            except (UpstreamUnavailable, TokenRequestRejected) as exc:
                # The authorization server is down, or refused in a way that does not end the
                # grant (invalid_scope, invalid_request, a 4xx without a code; the failure is on
                # the credential already): a token still valid for what the caller asked is
                # better than an error. A terminal refusal became ReconnectRequired earlier.
                if lifecycle.is_terminal(exc) or not credential.valid_for(self._clock.now(), floor):
                    raise
        self.usage.used(user, upstream.key, self._clock.now())
        return self._resolved(credential, upstream)

    async def _check_scopes(
        self, user: str, upstream: UpstreamConfig, credential: Credential, required: tuple[str, ...]
    ) -> None:
        """Raise InsufficientScope when ``credential`` lacks some of ``required``: its URL's flow
        asks for the granted scopes and the required ones (broker/scopes.py)."""
        lacking = scopes.missing(credential.scopes, required)
        if lacking:
            asked = scopes.flow_scopes(upstream.auth_broker.scopes, credential.scopes, required)
            request = await self._flow_for_answer(user, upstream, asked)
            url = request.authorization_url if request is not None else ""
            raise scopes.InsufficientScope(upstream.name, url, lacking)

    def _refreshed_recently(self, credential: Credential, now: float) -> bool:
        """True when a refresh now would be pointless: the credential was refreshed (or
        connected) less than ``min_refresh_interval_seconds`` ago and still covers the broker's
        own refresh window, so only a caller's larger ``min_valid_seconds`` is unmet, and a new
        token would not meet it either. The caller gets this one, with its true expires_at."""
        return credential.refreshed_within(
            now, self._config.min_refresh_interval_seconds
        ) and credential.valid_for(now, self._config.refresh_window_seconds)

    async def _read(self, user: str, upstream: UpstreamConfig, recent: bool = False) -> Credential | None:
        """The stored credential (:meth:`_load`), read in a worker thread when the store's reads
        may wait (PostgreSQL) and the read cache cannot answer: a read stuck behind a lock
        stalls no other call."""
        if self._vault.must_wait(user, upstream.key, recent):
            return await asyncio.to_thread(self._load, user, upstream, recent)
        return self._load(user, upstream, recent)

    def _load(self, user: str, upstream: UpstreamConfig, recent: bool = False) -> Credential | None:
        try:
            found = self._vault.get(user, upstream.key, recent=recent)
        except DecryptionError:
            self._log.error(
                "stored credential failed to decrypt",
                extra=fields(user_id=user, upstream=upstream.name),
            )
            return Credential(
                user, upstream.key, Secrets(""), "", (), 0.0, "", 0.0, CredentialStatus.NEEDS_REAUTH
            )
        return None if found is None else found[0]

    async def _refresh_rejected(
        self, user: str, upstream: UpstreamConfig, credential: Credential, rejected: str
    ) -> Credential:
        """The upstream refused the stored access token: refresh once, in the single flight,
        unless the credential was refreshed less than ``min_refresh_interval_seconds`` ago or
        (re-read under the refresh lease) no longer holds that token."""
        interval = self._config.min_refresh_interval_seconds
        now = self._clock.now()
        if credential.refreshed_within(now, interval):
            return credential
        if credential.next_attempt_at is not None and now < credential.next_attempt_at:
            raise UpstreamUnavailable(
                "the authorization server failed recently; the broker retries after a backoff"
            )

        def due(stored: Credential, at: float) -> bool:
            return rejected_token.is_stored_token(
                rejected, stored.secrets.access_token
            ) and not stored.refreshed_within(at, interval)

        return await self._flights.run(
            (user, upstream.key), lambda: self._audited_refresh(user, upstream, None, due)
        )

    async def _connect_error(
        self,
        kind: type[NotConnected] | type[ReconnectRequired],
        user: str,
        upstream: UpstreamConfig,
        required: tuple[str, ...] = (),
    ) -> NotConnected | ReconnectRequired | SubjectTokenRequired:
        if upstream.auth_broker.mode is not Mode.OAUTH_CONNECT:
            return exchange.renewal_refused(upstream)  # no flow: the user's token is needed
        asked = scopes.flow_scopes(upstream.auth_broker.scopes, (), required) if required else ()
        request = await self._flow_for_answer(user, upstream, asked)
        if kind is NotConnected:
            text = f"user has not connected upstream {upstream.name!r}; send them to the authorization_url"
        else:
            text = (
                f"the credential for upstream {upstream.name!r} can no longer be refreshed; "
                "send the user to the authorization_url to reconnect"
            )
        if request is None:  # connection params needed, and none known for this user
            text = text.split(";")[0] + "; call BuildAuthorizationURL with its connection_params"
        return kind(
            text, upstream=upstream.name, authorization_url=request.authorization_url if request else ""
        )

    @staticmethod
    def _resolved(credential: Credential, upstream: UpstreamConfig) -> ResolvedCredential:
        auth = upstream.auth_broker
        token = credential.secrets.access_token
        return ResolvedCredential(  # positional: on every Resolve, and keywords cost more
            token,
            credential.token_type,
            credential.expires_at,
            credential.scopes,
            credential.obtained_via,
            auth.header,
            auth.header_format.replace("{token}", token),
            credential.secrets.fields,
        )
