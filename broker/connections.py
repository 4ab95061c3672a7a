"""Connection management: what a user has connected, and real disconnection.

``ListConnections`` reads clear metadata from the store (and checks the record still opens);
it mints no authorization URL and returns no token. ``Disconnect`` revokes the refresh token
and the access token at the upstream (RFC 7009), then deletes the local credential whatever
the revocation's outcome, and says exactly what happened to each token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker import connection_values, events, validation
from broker.clock import Clock
from broker.config import BrokerConfig, UpstreamConfig
from broker.errors import DecryptionError, InvalidArgument, StoreError, UnknownUpstream
from broker.models import Credential, CredentialStatus
from broker.oauth.client import ClientCredentials
from broker.oauth.rfc7009 import FAILED, RevocationClient, RevocationOutcome
from broker.store.base import CredentialRow
from broker.vault import CredentialVault

CONNECTED = "connected"
EXPIRED = "expired"
NEEDS_REAUTH = "needs_reauth"
NOT_CONNECTED = "not_connected"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Connection:
    """One user's credential for one upstream, as callers may see it: never a token."""

    upstream: str
    status: str
    mode: str
    scopes: tuple[str, ...] = ()
    expires_at: float | None = None
    obtained_via: str = ""
    updated_at: float | None = None
    last_error: str = ""
    connection_fields: tuple[tuple[str, str], ...] = ()
    # Health: see ``health`` below.
    refresh_token_expires_at: float | None = None
    last_refreshed_at: float | None = None
    last_used_at: float | None = None
    consecutive_failures: int = 0
    next_retry_at: float | None = None


@dataclass(frozen=True, slots=True)
class Disconnection:
    deleted: bool
    revocations: tuple[RevocationOutcome, ...]


def health(row: CredentialRow) -> dict[str, Any]:
    """A stored credential's health fields. ``last_refreshed_at``: the last time a refresh
    stored a new token (unset while the connect flow's own token is the newest: the row's
    last_refresh_at is then its creation time). ``next_retry_at``: only while failures are
    counted (a credential without a refresh token is also kept out of scans, not retried)."""
    refreshed = row.last_refresh_at
    return {
        "refresh_token_expires_at": row.refresh_token_expires_at,
        "last_refreshed_at": None if refreshed is None or refreshed == row.created_at else refreshed,
        "last_used_at": row.last_used_at,
        "consecutive_failures": row.failure_count,
        "next_retry_at": row.next_attempt_at if row.failure_count > 0 else None,
    }


def client_credentials(upstream: UpstreamConfig) -> ClientCredentials:
    auth = upstream.auth_broker
    secret = auth.client_secret.get_secret_value() if auth.client_secret else None
    return ClientCredentials(auth.client_id, secret, auth.token_endpoint_auth_method)


def revocation_endpoint(upstream: UpstreamConfig, credential: Credential | None) -> str | None:
    """The upstream's revocation endpoint, filled with the connection's params. None when there
    is none, or when its params no longer match the config (nothing is sent then)."""
    template = upstream.auth_broker.revocation_endpoint
    if template is None or credential is None:
        return template
    try:
        return connection_values.endpoint(upstream, template, credential.secrets.params)
    except InvalidArgument:
        return None


class ConnectionManager:
    """Lists and disconnects a user's upstream credentials."""

    def __init__(
        self,
        config: BrokerConfig,
        vault: CredentialVault,
        revocation: RevocationClient,
        clock: Clock,
    ) -> None:
        self._config = config
        self._vault = vault
        self._revocation = revocation
        self._clock = clock

    def _upstream(self, name: str) -> UpstreamConfig:
        found = self._config.upstream(validation.upstream(name))
        if found is None:
            raise UnknownUpstream(f"upstream {name!r} is not configured")
        return found

    async def list_connections(
        self, user_id: str, visible: Callable[[str], bool] = lambda _: True
    ) -> list[Connection]:
        """One entry per configured upstream the caller may see."""
        user = validation.user_id(user_id)
        upstreams = [u for u in self._config.upstreams if visible(u.name)]
        return await asyncio.to_thread(self._list, user, upstreams)

    def _list(self, user: str, upstreams: list[UpstreamConfig]) -> list[Connection]:
        now = self._clock.now()
        out = []
        for upstream in upstreams:
            mode = upstream.auth_broker.mode.value
            fields: tuple[tuple[str, str], ...] = ()
            try:
                row = self._vault.store.get_credential(user, upstream.key)
                if row is not None:
                    # A record that no longer opens is unavailable.
                    fields = self._vault.open_row(row).secrets.fields
            except (DecryptionError, StoreError) as exc:
                out.append(Connection(upstream.name, UNAVAILABLE, mode, last_error=exc.code.lower()))
                continue
            if row is None:
                out.append(Connection(upstream.name, NOT_CONNECTED, mode))
                continue
            if row.status == CredentialStatus.NEEDS_REAUTH.value:
                status = NEEDS_REAUTH
            elif row.status == CredentialStatus.ERROR.value:
                status = UNAVAILABLE
            elif row.expires_at is not None and row.expires_at <= now:
                status = EXPIRED
            else:
                status = CONNECTED
            out.append(
                Connection(
                    upstream=upstream.name,
                    status=status,
                    mode=mode,
                    scopes=row.scopes,
                    expires_at=row.expires_at,
                    obtained_via=row.obtained_via,
                    updated_at=row.updated_at,
                    last_error=row.last_error or "",
                    connection_fields=fields,
                    **health(row),
                )
            )
        return out

    async def disconnect(self, user_id: str, upstream_name: str) -> Disconnection:
        """Revoke (refresh token first, RFC 7009 section 2.1) and delete."""
        user = validation.user_id(user_id)
        upstream = self._upstream(upstream_name)
        credential: Credential | None = None
        unreadable = False
        try:
            found = await asyncio.to_thread(self._vault.get, user, upstream.key)
            credential = None if found is None else found[0]
        except DecryptionError:
            unreadable = True
        endpoint = revocation_endpoint(upstream, credential)
        client = client_credentials(upstream)
        outcomes: list[RevocationOutcome] = []
        for hint in ("refresh_token", "access_token"):
            if unreadable:
                outcomes.append(RevocationOutcome(hint, FAILED, "record_unreadable"))
                continue
            secrets = credential.secrets if credential is not None else None
            token = getattr(secrets, hint) if secrets is not None else None
            outcomes.append(
                await self._revocation.revoke(
                    endpoint, token, hint, client, upstream.auth_broker.revocation_request_format == "json"
                )
            )
        event = events.disconnected(user, upstream.key, self._clock.now())
        deleted = await asyncio.to_thread(self._vault.store.delete_credential, user, upstream.key, event)
        self._vault.forget(user, upstream.key)
        return Disconnection(deleted, tuple(outcomes))
