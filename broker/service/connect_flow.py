"""The connect flow use case: authorization code + PKCE (RFC 6749 section 4.1, RFC 7636),
with PAR (RFC 9126) and hosted connect; the flow a NOT_CONNECTED answer sends the user to;
completing (RFC 9207 iss check) or denying a flow; the credential a token answer makes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping

from broker import connection_values, scopes, validation
from broker.config import UpstreamConfig
from broker.errors import (
    DecryptionError,
    FlowNotFound,
    InvalidArgument,
    IssuerMismatch,
    PermissionDenied,
    TooManyPendingFlows,
)
from broker.logs import fields
from broker.models import AuthorizationRequest, Credential, CredentialInfo, ObtainedVia, PendingFlow, Secrets
from broker.oauth import rfc6749, rfc7636, rfc9126
from broker.oauth.rfc6749 import TokenResponse
from broker.providers import shaping
from broker.service.base import ServiceBase
from broker.service.refresh import refresh_token_expiry


class ConnectFlowService(ServiceBase):
    """Starts, reuses, completes and denies connect flows."""

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
            stored = await self._read(user, upstream)
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
        iss_format(iss)  # every field is checked before the state is consumed
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


def iss_format(iss: str) -> None:
    """A callback's ``iss`` must be printable text of at most 2048 characters (or absent)."""
    if len(iss) > 2048 or (iss and not iss.isprintable()):
        raise InvalidArgument("iss: must be printable text of at most 2048 characters")


def check_iss(upstream: UpstreamConfig, iss: str) -> None:
    """RFC 9207 section 2.4: when the server sends iss (or says it does), it must be the issuer
    the request went to; otherwise the response may come from a mix-up attack."""
    auth = upstream.auth_broker
    iss_format(iss)
    if auth.authorization_response_iss_parameter_supported and not iss:
        raise IssuerMismatch(
            f"iss: required for upstream {upstream.name!r} (its authorization server sends it, RFC 9207)"
        )
    if iss and auth.issuer is not None and iss != auth.issuer:
        raise IssuerMismatch(
            f"iss: the response is not from upstream {upstream.name!r}'s authorization server (RFC 9207)"
        )
