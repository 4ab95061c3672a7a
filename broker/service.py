"""The broker's use cases: connect flow, refresh and resolve. No gRPC, no SQL here.

Store writes run in worker threads (``asyncio.to_thread``); the single-row read that a cached
Resolve needs runs inline because it takes microseconds and a thread hop would cost more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from broker import connection_values, events, exchange, lifecycle, rejected_token, scopes, validation
from broker.audit import Auditor
from broker.clock import Clock
from broker.config import BrokerConfig, Mode, UpstreamConfig
from broker.errors import (
    BrokerError,
    DecryptionError,
    FlowNotFound,
    InvalidArgument,
    IssuerMismatch,
    NotConnected,
    NotImplementedMode,
    PermissionDenied,
    ReconnectRequired,
    SubjectTokenRequired,
    TokenRequestRejected,
    TooManyPendingFlows,
    UnknownUpstream,
    UpstreamUnavailable,
)
from broker.exchange import TokenExchanger
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
from broker.oauth import client_auth, rfc6749, rfc7636, rfc9126
from broker.oauth.client import ClientCredentials, TokenEndpointClient
from broker.oauth.rfc6749 import TokenResponse
from broker.policy import AllowAll, PolicyEnforcer, PolicyRequest
from broker.providers import shaping
from broker.singleflight import SingleFlight
from broker.usage import UsageStamps
from broker.vault import CredentialVault

# How often a process that did not get a refresh lease looks for the holder's result.
_LEASE_POLL_SECONDS = 0.02
# A refresh lease runs this much longer than the token request made under it, for the store
# write that follows the answer (see BrokerService._refresh).
_LEASE_MARGIN_SECONDS = 5.0


class BrokerService:
    """Obtains, stores, refreshes and hands out per-user credentials."""

    def __init__(
        self,
        config: BrokerConfig,
        vault: CredentialVault,
        tokens: TokenEndpointClient,
        clock: Clock,
        logger: logging.Logger | None = None,
        exchanger: TokenExchanger | None = None,
        policy: PolicyEnforcer | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self._audit = auditor or Auditor()
        self._config = config
        self._vault = vault
        self._tokens = tokens
        self._clock = clock
        self._log = logger or get_logger()
        self._by_name = {u.name: u for u in config.upstreams}
        self._by_key = {u.key: u for u in config.upstreams}
        self._flights: SingleFlight[Credential] = SingleFlight()
        # Concurrent "connect first" answers for one (user, upstream) share one flow lookup/start.
        self._flow_flights: SingleFlight[AuthorizationRequest | None] = SingleFlight()
        #: New flows refused since start because max_pending_flows_total were pending.
        self.flows_refused = 0
        self._exchanger = exchanger or TokenExchanger(vault, tokens, clock, self._log)
        if self._exchanger.renew is None:  # long-running on-behalf-of: renewed as a refresh
            self._exchanger.renew = self._renew_exchanged
        self._pusher = rfc9126.PushClient(tokens)
        self._policy = policy or PolicyEnforcer(AllowAll(), self._log)
        # Who holds a refresh lease, and for how long: one token request plus a margin.
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lease_seconds = config.http.timeout_seconds + _LEASE_MARGIN_SECONDS
        #: ListConnections' last_used_at, stamped by Resolve at most once a minute per credential.
        self.usage = UsageStamps(vault.store, logger=self._log)

    @property
    def flights(self) -> SingleFlight[Credential]:
        return self._flights

    # -- lookup --------------------------------------------------------------------------

    def _upstream(self, name: str) -> UpstreamConfig:
        found = self._by_name.get(name)  # a configured name is valid: check only the others
        if found is None:
            validation.upstream(name)
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

    def _refreshable(self, name: str) -> UpstreamConfig:
        """An upstream whose credentials carry a refresh token the broker uses (oauth_connect,
        or an exchange mode with ``store_refresh_token``)."""
        upstream = self._upstream(name)
        if not upstream.auth_broker.refreshable:
            return self._oauth_connect(name)  # raises its NotImplementedMode
        return upstream

    @staticmethod
    def _client(upstream: UpstreamConfig, params: connection_values.Pairs = ()) -> ClientCredentials:
        return client_auth.client_credentials(upstream, params)

    # -- connect flow --------------------------------------------------------------------

    async def build_authorization_url(
        self, user_id: str, upstream_name: str, connection_params: Mapping[str, str] | None = None
    ) -> AuthorizationRequest:
        """Start an authorization-code + PKCE flow (RFC 6749 section 4.1, RFC 7636).
        ``connection_params``: the values of the upstream's declared per-connection params,
        each checked against its pattern before anything is stored."""
        user = validation.user_id(user_id)
        upstream = self._oauth_connect(upstream_name)
        params = connection_values.connect_params(upstream, connection_params or {})
        return await self._start_flow(user, upstream, params)

    async def _start_flow(
        self,
        user: str,
        upstream: UpstreamConfig,
        params: connection_values.Pairs = (),
        asked: tuple[str, ...] = (),
    ) -> AuthorizationRequest:
        """A new flow, stored (sealed) before its URL is handed out. Raises TooManyPendingFlows
        when ``max_pending_flows_total`` flows of all users are pending: nobody's is evicted.
        ``asked``: the scopes it asks for (broker/scopes.py); empty: the configured ones."""
        verifier, state = rfc7636.new_verifier(), rfc7636.new_state()
        now = self._clock.now()
        flow = PendingFlow(
            state_hash=rfc7636.state_hash(state),
            user_id=user,
            upstream_key=upstream.key,
            verifier=verifier,
            created_at=now,
            expires_at=now + self._config.flow_ttl_seconds,
            state=state,
            params=params,
            # Hosted connect: the user gets a one-time /start link, never the state.
            start_ref=rfc7636.new_state() if self._config.connect is not None else "",
            scopes=asked,
        )
        # Built (and, with PAR, pushed) before the flow is stored: a failed push stores nothing.
        request = await self._authorization(upstream, flow)
        added = await asyncio.to_thread(
            self._vault.add_flow,
            flow,
            self._config.max_pending_flows,
            now,
            self._config.max_pending_flows_total,
        )
        if not added:
            self.flows_refused += 1
            self._log.warning(
                "connect flow refused: max_pending_flows_total reached",
                extra=fields(user_id=user, upstream=upstream.name),
            )
            raise TooManyPendingFlows(
                f"too many connect flows are pending (max_pending_flows_total = "
                f"{self._config.max_pending_flows_total}); try again once some complete or expire"
            )
        self._log.info("connect flow started", extra=fields(user_id=user, upstream=upstream.name))
        return request

    async def _authorization(self, upstream: UpstreamConfig, flow: PendingFlow) -> AuthorizationRequest:
        """Where to send the user for ``flow``: the authorization server, or with hosted connect
        the flow's one-time /start link (and no state: the broker's callback completes it; with
        PAR the request is pushed when a browser opens the link)."""
        if flow.start_ref and self._config.connect is not None:
            return AuthorizationRequest(self._config.connect.start_url(flow.start_ref), "", flow.expires_at)
        url, expires_at = await self.provider_url(upstream, flow)
        return AuthorizationRequest(url, flow.state, expires_at)

    async def provider_url(self, upstream: UpstreamConfig, flow: PendingFlow) -> tuple[str, float]:
        """The authorization URL of ``flow`` (RFC 6749 section 4.1.1, RFC 7636 section 4.3) and
        until when it works. With pushed_authorization_requests the parameters are pushed first
        (RFC 9126) and the URL, valid no longer than its request_uri, carries only client_id and
        request_uri."""
        auth = upstream.auth_broker
        assert auth.authorization_endpoint and auth.client_id and auth.redirect_uri  # by config
        params = shaping.authorization_params(auth, flow.state, flow.verifier, flow.scopes)
        endpoint = connection_values.endpoint(upstream, auth.authorization_endpoint, flow.params)
        if auth.pushed_authorization_requests:
            assert auth.pushed_authorization_request_endpoint is not None  # by config or discovery
            pushed = await self._pusher.push(
                auth.pushed_authorization_request_endpoint,
                params,
                self._client(upstream, flow.params),
                upstream=upstream.name,
            )
            url = rfc9126.authorization_url(endpoint, auth.client_id, pushed)
            return url, min(flow.expires_at, self._clock.now() + pushed.expires_in)
        return rfc6749.authorization_url(endpoint, params), flow.expires_at

    def upstream_by_key(self, key: str) -> UpstreamConfig | None:
        """The configured upstream of a store key (None when no longer configured)."""
        return self._by_key.get(key)

    async def _flow_for_answer(
        self, user: str, upstream: UpstreamConfig, asked: tuple[str, ...] = ()
    ) -> AuthorizationRequest | None:
        """The flow a NOT_CONNECTED / RECONNECT_REQUIRED answer sends the user to: the newest
        live one of (user, upstream) while it has at least half its lifetime left, so an app
        that polls Resolve never replaces (or, past max_pending_flows, evicts) the login the
        user is completing. Otherwise one new flow; if the global cap refuses it, a live older
        flow still serves. An upstream with connection params starts one only with the params
        of the user's stored connection; without any, None (no URL can be built). ``asked``: the
        scopes it must ask for (only a flow asking for the same set is reused)."""
        return await self._flow_flights.run(
            (user, upstream.key, *asked), lambda: self._reuse_flow(user, upstream, asked)
        )

    async def _reuse_flow(
        self, user: str, upstream: UpstreamConfig, asked: tuple[str, ...] = ()
    ) -> AuthorizationRequest | None:
        now = self._clock.now()
        try:
            newest = await asyncio.to_thread(self._vault.newest_flow, user, upstream.key, now)
        except DecryptionError:
            # Damaged, or sealed before flows were bound to their upstream: start a new one.
            self._log.warning(
                "pending flow failed to decrypt; starting a new one",
                extra=fields(user_id=user, upstream=upstream.name),
            )
            newest = None
        if newest is not None and (not newest.state or set(newest.scopes) != set(asked)):
            newest = None  # written without its state (its URL cannot be rebuilt), or other scopes
        if newest is not None and self._config.connect is not None and (newest.bound or not newest.start_ref):
            newest = None  # hosted connect: its /start link is used up (or it never had one)
        if newest is not None and newest.expires_at - now >= (newest.expires_at - newest.created_at) / 2:
            return await self._authorization(upstream, newest)
        params: connection_values.Pairs = ()
        if connection_values.needs_params(upstream):
            stored = self._load(user, upstream)
            params = stored.secrets.params if stored is not None else ()
            if not params:
                return None if newest is None else await self._authorization(upstream, newest)
        try:
            return await self._start_flow(user, upstream, params, asked)
        except TooManyPendingFlows:
            if newest is None:
                raise
            return await self._authorization(upstream, newest)

    async def complete(
        self,
        state: str,
        code: str,
        user_id: str,
        iss: str = "",
        callback_params: Mapping[str, str] | None = None,
    ) -> CredentialInfo:
        """Finish a connect flow: check the state and the user, exchange the code, store.
        ``callback_params``: the callback's other query parameters, read only for the
        upstream's declared connection fields."""
        validation.state(state)
        validation.code(code)
        user = validation.user_id(user_id)
        callback = callback_params or {}
        connection_values.check_callback_params(callback)
        # Consumed on first use, whatever happens next.
        flow = await self._take_flow(state)
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
        if flow.start_ref:
            self._log.warning(
                "hosted connect flow completed through Complete; refused",
                extra=fields(user_id=user, upstream=upstream.name),
            )
            raise PermissionDenied(
                "this connect flow belongs to hosted connect: the broker's callback completes it "
                "in the browser that opened its link"
            )
        return await self.finish_flow(upstream, flow, code, iss, callback)

    async def finish_flow(
        self,
        upstream: UpstreamConfig,
        flow: PendingFlow,
        code: str,
        iss: str,
        callback: Mapping[str, str],
    ) -> CredentialInfo:
        """Exchange the code of a taken, live ``flow`` (its user already checked) and store the
        credential for the flow's user. ``callback``: the callback's other query parameters
        (already checked with ``connection_values.check_callback_params``)."""
        user, state = flow.user_id, flow.state
        check_iss(upstream, iss)
        auth = upstream.auth_broker
        form = shaping.code_grant_form(auth, code, flow.verifier)
        token = await self._request(upstream, form, user, params=flow.params)
        now = self._clock.now()
        kept = connection_values.connect_fields(upstream, flow.params, callback, (code, state))
        credential = self._credential(
            user, upstream, token, ObtainedVia.CONNECT_FLOW, None, now, flow.params, kept
        )
        if token.scope is None and flow.scopes:
            credential = dataclasses.replace(credential, scopes=flow.scopes)  # RFC 6749 section 5.1
        previous = await asyncio.to_thread(self._vault.store.get_credential, user, upstream.key)
        event = scopes.completion_event(
            user, upstream.key, None if previous is None else previous.scopes, credential.scopes, now
        )
        await asyncio.to_thread(self._vault.save, credential, None, now, event)
        self._log.info("connected", extra=fields(user_id=user, upstream=upstream.name))
        return self._info(credential, upstream)

    async def _take_flow(self, state: str) -> PendingFlow | None:
        """Remove and return the flow of ``state``; consumed on first use, whatever happens next.
        A flow whose record does not open is gone too: the user starts a new one."""
        try:
            return await asyncio.to_thread(self._vault.take_flow, rfc7636.state_hash(state))
        except DecryptionError:
            self._log.error("pending flow failed to decrypt; dropped")
            return None

    async def deny(self, state: str, error: str, error_description: str) -> None:
        """The user refused (or the server failed) the authorization: drop the flow."""
        validation.state(state)
        code = validation.oauth_error(error)
        validation.error_description(error_description)  # checked, never logged or stored
        flow = await self._take_flow(state)
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
        upstream = self._refreshable(upstream_name)
        credential = await self._flights.run(
            (user, upstream.key), lambda: self._refresh(user, upstream, None)
        )
        return self._info(credential, upstream)

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
        credential = self._load(user, upstream, recent=True)
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

    async def _renew_exchanged(self, user: str, upstream: UpstreamConfig, window: int) -> Credential:
        """A long-running exchanged credential renewed with its stored refresh token: the same
        single flight, refresh lease and backoff as an oauth_connect refresh (broker/exchange.py)."""
        return await self._flights.run(
            (user, upstream.key), lambda: self._audited_refresh(user, upstream, window)
        )

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

    async def _audited_refresh(
        self,
        user: str,
        upstream: UpstreamConfig,
        window: int | None,
        due: Callable[[Credential, float], bool] | None = None,
    ) -> Credential:
        """A refresh that Resolve started on its own: audited once per grant, not per caller."""
        try:
            credential = await self._refresh(user, upstream, window, due)
        except BrokerError as exc:
            self._audit.record("refresh", "failure", user=user, upstream=upstream.name, reason=exc.code)
            raise
        self._audit.record("refresh", "success", user=user, upstream=upstream.name)
        return credential

    async def refresh_if_due(
        self, user: str, upstream_key: str, due: Callable[[Credential, float], bool]
    ) -> bool:
        """Background refresh (broker/refresher.py): refresh (user, upstream) through the same
        single flight and refresh lease as Resolve, while ``due(credential, now)`` holds for the
        row as re-read here (after any other process's refresh). True when this process made
        the grant; False when it was no longer due. Raises as a refresh does."""
        upstream = self._by_key.get(upstream_key)
        if upstream is None or not upstream.auth_broker.refreshable:
            return False
        verdict: list[bool] = []
        seen: list[int] = []

        def still_due(credential: Credential, now: float) -> bool:
            verdict.append(due(credential, now))
            seen.append(credential.generation)
            return verdict[-1]

        try:
            result = await self._flights.run(
                (user, upstream.key), lambda: self._refresh(user, upstream, None, still_due)
            )
        except BrokerError as exc:
            self._audit.record("refresh", "failure", user=user, upstream=upstream.name, reason=exc.code)
            raise
        if verdict and verdict[-1] and result.generation != seen[-1]:
            self._audit.record("refresh", "success", user=user, upstream=upstream.name)
            return True
        # Not due any more, a Resolve's refresh already in flight did it, or another process
        # holds the lease.
        return False

    async def _refresh(
        self,
        user: str,
        upstream: UpstreamConfig,
        window: int | None,
        due: Callable[[Credential, float], bool] | None = None,
    ) -> Credential:
        """One refresh_token grant, inside this process's single flight for (user, upstream).

        ``window`` None forces the refresh; otherwise a credential that another caller already
        refreshed (still valid for ``window``) is returned as is. Across processes sharing the
        store, the refresh lease (claimed by compare-and-swap on the row's generation in one
        immediate transaction) means a refresh token is presented at most once: a process that
        does not get the lease waits for the holder's result and uses it."""
        loop = asyncio.get_running_loop()
        # The wait for another process's lease is bounded (store.lock_timeout_seconds); every poll
        # re-reads the row, so a waiter that gives up has just re-checked for a fresh credential.
        give_up = loop.time() + min(self._lease_seconds + 1.0, self._config.store.lock_timeout_seconds)
        first_generation: int | None = None
        first_failures = 0
        raced = False
        while True:
            credential = self._load(user, upstream)
            if credential is None:
                raise await self._connect_error(NotConnected, user, upstream)
            now = self._clock.now()
            if due is not None and not due(credential, now):
                return credential  # a background refresh that is no longer due (refresh_if_due)
            if first_generation is None:
                first_generation, first_failures = credential.generation, credential.failure_count
            elif (
                window is None
                and credential.generation != first_generation
                and credential.status is not CredentialStatus.NEEDS_REAUTH
            ):
                return credential  # another process refreshed while this one waited
            elif (
                window is None
                and credential.generation == first_generation
                and credential.failure_count > first_failures
                and credential.status is CredentialStatus.ERROR
            ):
                # Another process's refresh failed while this one waited: that attempt was made
                # for us too. Presenting the same refresh token at once could collide with a
                # request the server is still answering.
                raise UpstreamUnavailable(
                    "another broker process's refresh of this credential just failed; try again later"
                )
            if window is not None and (
                credential.valid_for(now, window) or self._refreshed_recently(credential, now)
            ):
                return credential
            refresh_token = credential.secrets.refresh_token
            if credential.status is CredentialStatus.NEEDS_REAUTH or not refresh_token:
                raise await self._connect_error(ReconnectRequired, user, upstream)
            if (
                window is not None
                and credential.next_attempt_at is not None
                and now < credential.next_attempt_at
            ):
                raise UpstreamUnavailable(
                    "the authorization server failed recently; the broker retries after a backoff"
                )
            # The request's deadline is fixed before the claim: the lease (timeout + margin) starts
            # when the store runs the claim, which is later, so it outlives the request, the wait
            # for a request slot included. (PostgreSQL times the lease by its own clock.)
            deadline = loop.time() + self._config.http.timeout_seconds
            claimed = await asyncio.to_thread(
                self._vault.store.claim_refresh,
                user,
                upstream.key,
                credential.generation,
                self._owner,
                now,
                self._lease_seconds,
                credential.failure_count,  # a failure recorded since this read voids the claim
            )
            if claimed:
                renewed = await self._refresh_claimed(user, upstream, credential, refresh_token, deadline)
                if renewed is not None:
                    return renewed
                if raced:
                    raise await self._connect_error(ReconnectRequired, user, upstream)
                raced = True  # the refresh token changed under us: go round once with the new one
                first_generation = None
                continue
            if due is not None:
                # A background refresh: another process holds the lease (or just wrote the row)
                # and does this one. Waiting would hold a refresher slot that could serve the
                # next credential; the next tick looks again.
                return credential
            if loop.time() > give_up:
                self._log.warning(
                    "timed out waiting for another process's refresh",
                    extra=fields(user_id=user, upstream=upstream.name),
                )
                raise UpstreamUnavailable("another broker process is refreshing this credential; try again")
            await asyncio.sleep(_LEASE_POLL_SECONDS)

    async def _refresh_claimed(
        self,
        user: str,
        upstream: UpstreamConfig,
        credential: Credential,
        refresh_token: str,
        deadline: float,
    ) -> Credential | None:
        """Present the refresh token (this process holds the lease until after ``deadline``).
        None means the stored refresh token changed meanwhile and the caller should look again.

        No scope parameter: RFC 6749 section 6, the original grant stands."""
        form = shaping.refresh_grant_form(upstream.auth_broker, refresh_token)
        try:
            token = await self._request(upstream, form, user, deadline, credential.secrets.params)
        except (TokenRequestRejected, UpstreamUnavailable) as exc:
            if isinstance(exc, TokenRequestRejected) and (
                exc.oauth_error == "invalid_grant" or exc.reconnect
            ):
                # A race, not a revocation, when someone stored a new refresh token meanwhile.
                fresh = self._load(user, upstream)
                if (
                    fresh is not None
                    and fresh.status is not CredentialStatus.NEEDS_REAUTH
                    and fresh.secrets.refresh_token not in (None, refresh_token)
                ):
                    self._log.info(
                        "refresh token changed during the refresh; using the newer credential",
                        extra=fields(user_id=user, upstream=upstream.name),
                    )
                    return None
            await self._record_failure(user, upstream, credential, exc)
            if lifecycle.is_terminal(exc):
                raise await self._connect_error(ReconnectRequired, user, upstream) from None
            raise
        now = self._clock.now()
        # A response without a refresh token keeps the old one (RFC 6749 section 6); the new
        # access token and a rotated refresh token are written together, in one row, before
        # either is handed to anyone.
        renewed = self._credential(user, upstream, token, credential.obtained_via, credential, now)
        event = events.refreshed(credential, now)
        generation = await asyncio.to_thread(self._vault.save, renewed, credential.generation, now, event)
        if generation is None:
            # Someone rewrote the row meanwhile (a reconnect, or a lease that expired): theirs wins.
            winner = self._load(user, upstream)
            if winner is None:
                raise await self._connect_error(NotConnected, user, upstream)
            return winner
        self._log.info("refreshed", extra=fields(user_id=user, upstream=upstream.name))
        return dataclasses.replace(renewed, generation=generation, last_refresh_at=now)

    async def _record_failure(
        self, user: str, upstream: UpstreamConfig, credential: Credential, exc: BrokerError
    ) -> None:
        """needs_reauth for a terminal error; otherwise error, one more failure, and a backoff."""
        kind = lifecycle.error_class(exc)
        if lifecycle.is_terminal(exc):
            status, retry_at = CredentialStatus.NEEDS_REAUTH, None
            self._log.warning(
                "refresh refused; reconnect required",
                extra=fields(user_id=user, upstream=upstream.name, error=kind),
            )
        else:
            failures = credential.failure_count + 1
            status = CredentialStatus.ERROR
            wait = lifecycle.backoff_seconds(failures)
            if kind == "timeout":
                # A request cut at its deadline may still be processed by a slow server: give it
                # at least one more timeout before the same refresh token is presented again.
                wait = max(wait, self._config.http.timeout_seconds)
            retry_at = self._clock.now() + wait
            self._log.warning(
                "refresh failed; will retry",
                extra=fields(user_id=user, upstream=upstream.name, error=kind, failures=failures),
            )
        await asyncio.to_thread(
            self._vault.store.record_failure,
            user,
            upstream.key,
            status.value,
            kind,
            credential.generation,
            retry_at,
            events.refresh_failed(user, upstream.key, status, kind, self._clock.now()),
        )

    async def _request(
        self,
        upstream: UpstreamConfig,
        form: Sequence[tuple[str, str]],
        user: str,
        deadline: float | None = None,
        params: connection_values.Pairs = (),
    ) -> TokenResponse:
        auth = upstream.auth_broker
        refreshing = shaping.is_refresh(form)
        endpoint = connection_values.endpoint(upstream, shaping.token_endpoint(auth, refreshing), params)
        try:
            return await self._tokens.request_token(
                endpoint,
                form,
                self._client(upstream, params),
                upstream=upstream.name,
                deadline=deadline,
                json_body=auth.token_request_format == "json",
                parse=shaping.answer_parser(auth, refreshing),
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

    # -- mapping -------------------------------------------------------------------------

    def _credential(
        self,
        user: str,
        upstream: UpstreamConfig,
        token: TokenResponse,
        obtained_via: str,
        previous: Credential | None,
        now: float,
        params: connection_values.Pairs | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> Credential:
        """The credential to store from a token answer. A refresh (``previous``) keeps the
        connection's params and fields, updated by what this answer carries."""
        refresh = token.refresh_token or (previous.secrets.refresh_token if previous else None)
        if params is None:
            params = previous.secrets.params if previous else ()
        kept = connection_values.merged_fields(
            upstream, previous.secrets.fields if previous else (), fields or {}, token.fields
        )
        if token.scope is not None:
            scopes = token.scope
        elif previous is not None:
            scopes = previous.scopes
        else:
            scopes = upstream.auth_broker.scopes
        return Credential(
            user_id=user,
            upstream_key=upstream.key,
            secrets=Secrets(token.access_token, refresh, kept, params),
            token_type=token.token_type,
            scopes=scopes,
            expires_at=None if token.expires_in is None else now + token.expires_in,
            obtained_via=obtained_via,
            updated_at=now,
            refresh_token_expires_at=refresh_token_expiry(
                token, previous, now, upstream.auth_broker.refresh_token_lifetime_seconds
            ),
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


def refresh_token_expiry(
    token: TokenResponse, previous: Credential | None, now: float, lifetime: int | None = None
) -> float | None:
    """When the stored refresh token stops working: from the answer's refresh_token_expires_in
    when it sent one; the previous expiry when the answer kept the old refresh token (RFC 6749
    section 6: none sent, or the same one repeated); for a new refresh token without a lifetime,
    the upstream's fixed ``lifetime`` from now (refresh_token_lifetime_seconds), else unknown."""
    if token.refresh_token_expires_in is not None:
        return now + token.refresh_token_expires_in
    if previous is not None and (
        not token.refresh_token or token.refresh_token == previous.secrets.refresh_token
    ):
        return previous.refresh_token_expires_at
    if token.refresh_token and lifetime is not None:
        return now + lifetime
    return None


def check_iss(upstream: UpstreamConfig, iss: str) -> None:
    """RFC 9207 section 2.4: when the server sends iss (or says it does), it must be the issuer
    the request went to; otherwise the response may come from a mix-up attack."""
    auth = upstream.auth_broker
    if len(iss) > 2048 or (iss and not iss.isprintable()):
        raise InvalidArgument("iss: must be printable text of at most 2048 characters")
    if auth.authorization_response_iss_parameter_supported and not iss:
        raise IssuerMismatch(
            f"iss: required for upstream {upstream.name!r} (its authorization server sends it, RFC 9207)"
        )
    if iss and auth.issuer is not None and iss != auth.issuer:
        raise IssuerMismatch(
            f"iss: the response is not from upstream {upstream.name!r}'s authorization server (RFC 9207)"
        )
