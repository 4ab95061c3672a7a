"""Offboarding: DisconnectAll revokes and deletes every connection of one user.

For each configured upstream the caller may use and the user has a stored credential for, it
does what Disconnect does (broker/connections.py): revoke the refresh token, then the access
token, at the upstream's revocation endpoint (RFC 7009 section 2.1), then delete the credential
whatever the revocation's outcome, with a DISCONNECTED event written in the same transaction.
Upstreams are handled concurrently (each revocation endpoint has its own bounded slots), so one
slow provider does not hold up the others. Each upstream's outcome is audited on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from broker import validation
from broker.audit import Auditor
from broker.config import BrokerConfig, UpstreamConfig
from broker.connections import ConnectionManager, Disconnection
from broker.errors import BrokerError, DecryptionError
from broker.store.base import CredentialStore


@dataclass(frozen=True, slots=True)
class UpstreamDisconnection:
    """What DisconnectAll did for one upstream: never a token."""

    upstream: str
    result: Disconnection


class Offboarding:
    """The DisconnectAll use case."""

    def __init__(
        self,
        config: BrokerConfig,
        store: CredentialStore,
        connections: ConnectionManager,
        auditor: Auditor | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._connections = connections
        self._audit = auditor or Auditor()

    async def disconnect_all(
        self, user_id: str, may_use: Callable[[str], bool] = lambda _: True
    ) -> list[UpstreamDisconnection]:
        """Revoke and delete every credential of ``user_id`` on the upstreams ``may_use``
        allows, in configuration order; one entry per upstream that had a credential. Raises
        InvalidArgument for a bad user id (nothing is touched), or the first store error after
        every other upstream was handled (a retry finishes the rest)."""
        user = validation.user_id(user_id)
        upstreams = [u for u in self._config.upstreams if may_use(u.name)]
        held = await asyncio.to_thread(self._held, user, upstreams)
        outcomes = await asyncio.gather(
            *(self._disconnect(user, upstream) for upstream in held), return_exceptions=True
        )
        done: list[UpstreamDisconnection] = []
        failed: BaseException | None = None
        for outcome in outcomes:
            if isinstance(outcome, UpstreamDisconnection):
                done.append(outcome)
            elif failed is None:
                failed = outcome
        if failed is not None:
            raise failed
        return done

    def _held(self, user: str, upstreams: list[UpstreamConfig]) -> list[UpstreamConfig]:
        """The upstreams of which ``user`` has a stored credential (one that no longer opens
        counts: it is deleted too)."""
        held = []
        for upstream in upstreams:
            try:
                found = self._store.get_credential(user, upstream.key) is not None
            except DecryptionError:
                found = True
            if found:
                held.append(upstream)
        return held

    async def _disconnect(self, user: str, upstream: UpstreamConfig) -> UpstreamDisconnection:
        try:
            result = await self._connections.disconnect(user, upstream.name)
        except BrokerError as exc:
            self._audit.record("disconnect", "failure", user=user, upstream=upstream.name, reason=exc.code)
            raise
        detail = {"deleted": str(result.deleted).lower()}
        for revocation in result.revocations:
            detail[revocation.token_type_hint] = revocation.outcome + (
                f" ({revocation.reason})" if revocation.reason else ""
            )
        self._audit.record("disconnect", "success", user=user, upstream=upstream.name, detail=detail)
        return UpstreamDisconnection(upstream.name, result)
