"""The refresh use case (RFC 6749 section 6): on demand, for Resolve, for a rejected token,
for a long-running on-behalf-of credential, and in the background (broker/refresher.py); one
single flight per process and a refresh lease across processes, failures recorded with a
backoff.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

from broker import connection_values, events, lifecycle, validation
from broker.config import UpstreamConfig
from broker.errors import (
    BrokerError,
    NotConnected,
    ReconnectRequired,
    TokenRequestRejected,
    UpstreamUnavailable,
)
from broker.logs import fields
from broker.models import Credential, CredentialInfo, CredentialStatus
from broker.oauth.rfc6749 import TokenResponse
from broker.providers import shaping
from broker.service.base import ServiceBase

# How often a process that did not get a refresh lease looks for the holder's result.
_LEASE_POLL_SECONDS = 0.02


class RefreshService(ServiceBase):
    """Refreshes credentials with their stored refresh token."""

    async def refresh(self, user_id: str, upstream_name: str) -> CredentialInfo:
        """Refresh now, whatever the expiry (RFC 6749 section 6)."""
        user = validation.user_id(user_id)
        upstream = self._refreshable(upstream_name)
        credential = await self._flights.run(
            (user, upstream.key), lambda: self._refresh(user, upstream, None)
        )
        return self._info(credential, upstream)

    async def _renew_exchanged(self, user: str, upstream: UpstreamConfig, window: int) -> Credential:
        """A long-running exchanged credential renewed with its stored refresh token: the same
        single flight, refresh lease and backoff as an oauth_connect refresh (broker/exchange.py)."""
        return await self._flights.run(
            (user, upstream.key), lambda: self._audited_refresh(user, upstream, window)
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
            # Not joinable: it may give up without refreshing (no longer due, another process's
            # lease), which must never be the answer to a Resolve or Refresh that came meanwhile.
            result = await self._flights.run(
                (user, upstream.key), lambda: self._refresh(user, upstream, None, still_due), joinable=False
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
            credential = await self._read(user, upstream)
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
                fresh = await self._read(user, upstream)
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
            winner = await self._read(user, upstream)
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
            wait = lifecycle.retry_wait(exc, failures)  # the backoff, at least the Retry-After
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
