"""The hosted connect use cases: open a flow's /start link in a browser, and take its callback.

No HTTP here (broker/connect/server.py speaks it). The rule that the user who started a flow is
the one who completes it holds through the browser binding: a flow's /start link is opened once,
by one browser, which then holds the only secret whose hash the flow stores; the callback
completes the flow (for the user who started it) only when that browser brings the secret back.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from broker import connection_values, validation
from broker.audit import Auditor
from broker.clock import Clock
from broker.config import UpstreamConfig
from broker.errors import BrokerError, DecryptionError
from broker.logs import fields, get_logger
from broker.oauth import rfc6749, rfc7636
from broker.service import BrokerService
from broker.vault import CredentialVault

CONNECTED = "connected"
DENIED = "denied"
FAILED = "failed"
# Where the callback audit events say they came from (there is no RPC method).
_METHOD = "connect/callback"


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where a callback ends: ``status`` (connected, denied, failed), the flow's ``upstream``
    ("" when the flow is unknown), a stable ``reason`` ("" when connected: an OAuth error code
    or a broker error code in lower case, never free text) and the hash of the browser secret
    the flow was bound to (None when no flow matched), for the cookie to drop."""

    status: str
    upstream: str
    reason: str
    used_hash: str | None = None


class HostedConnect:
    """Start and callback of hosted connect flows, on top of the broker's connect flow."""

    def __init__(
        self,
        service: BrokerService,
        vault: CredentialVault,
        clock: Clock,
        auditor: Auditor | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._service = service
        self._vault = vault
        self._clock = clock
        self._audit = auditor or Auditor()
        self._log = logger or get_logger()
        # Callbacks being completed by this process: state hash -> (the browser hash that
        # matched, the outcome once known).
        self._running: dict[str, tuple[str, asyncio.Future[Outcome | None]]] = {}

    async def start(self, reference: str, browser_hash: str) -> str | None:
        """Bind the flow of ``reference`` to the browser whose secret hashes to
        ``browser_hash``, once; the authorization server URL to send that browser to, or None
        when the link is unknown, expired or already opened (by this browser or another)."""
        try:
            flow = await asyncio.to_thread(self._vault.bind_flow, reference, browser_hash, self._clock.now())
        except DecryptionError:
            self._log.error("pending flow failed to decrypt at /start")
            return None
        if flow is None:
            self._log.info("hosted connect link refused: unknown, expired or already opened")
            return None
        upstream = self._service.upstream_by_key(flow.upstream_key)
        if upstream is None:
            return None
        self._log.info(
            "hosted connect link opened", extra=fields(user_id=flow.user_id, upstream=upstream.name)
        )
        url, _ = await self._service.provider_url(upstream, flow)
        return url

    async def callback(
        self,
        state: str,
        browser_hashes: Sequence[str],
        *,
        code: str = "",
        error: str = "",
        iss: str = "",
        callback_params: Mapping[str, str] | None = None,
    ) -> Outcome | None:
        """Complete (or, with ``error``, deny) the flow of ``state`` for the browser holding one
        of ``browser_hashes``. None: refused, the flow is not this browser's (nothing changed).
        Raises InvalidArgument for a malformed state and StoreError when the store fails."""
        validation.state(state)
        callback = dict(callback_params or {})
        connection_values.check_callback_params(callback)
        state_hash = rfc7636.state_hash(state)
        earlier = await self._earlier(state_hash, browser_hashes)
        if earlier is not None:
            return earlier
        row = await asyncio.to_thread(self._vault.peek_flow, state_hash)
        if row is None:
            # Used, purged or never existed. A browser with no binding cookie at all is refused
            # like any stranger; one with a cookie was most likely here before (a reload).
            return Outcome(FAILED, "", "flow_not_found") if browser_hashes else None
        matched = _matching(row.browser_hash, browser_hashes)
        upstream = self._service.upstream_by_key(row.upstream_key)
        name = upstream.name if upstream is not None else ""
        if matched is None:
            self._log.warning(
                "hosted connect callback from a browser that did not open the flow; refused",
                extra=fields(user_id=row.user_id, upstream=name or None),
            )
            return None
        earlier = await self._earlier(state_hash, browser_hashes)  # a twin came in meanwhile
        if earlier is not None:
            return earlier
        answer: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        entry = (matched, answer)
        self._running[state_hash] = entry
        outcome: Outcome | None = None
        try:
            outcome = await self._complete(state_hash, matched, upstream, name, code, error, iss, callback)
            return outcome
        finally:
            if self._running.get(state_hash) is entry:
                del self._running[state_hash]
            answer.set_result(outcome)  # None (it raised or was cancelled): a reload starts afresh

    async def _earlier(self, state_hash: str, browser_hashes: Sequence[str]) -> Outcome | None:
        """The outcome of a callback of the same flow, from the same browser, that this process
        is completing (the user reloaded the callback page during a slow token request): that
        request took the flow, so this one would otherwise say flow_not_found for a flow being
        connected. None when there is none (or it ended without an outcome)."""
        running = self._running.get(state_hash)
        if running is None or _matching(running[0], browser_hashes) is None:
            return None
        return await asyncio.shield(running[1])

    async def _complete(
        self,
        state_hash: str,
        matched: str,
        upstream: UpstreamConfig | None,
        name: str,
        code: str,
        error: str,
        iss: str,
        callback: Mapping[str, str],
    ) -> Outcome:
        """Take the flow bound to the browser hash ``matched`` and complete or deny it."""
        try:
            flow = await asyncio.to_thread(self._vault.take_bound_flow, state_hash, matched)
        except DecryptionError:
            self._log.error("pending flow failed to decrypt; dropped")
            return Outcome(FAILED, name, DecryptionError.code.lower(), matched)
        if flow is None:  # another request with the same cookie took it meanwhile
            return Outcome(FAILED, name, "flow_not_found", matched)
        if upstream is None:
            return Outcome(FAILED, "", "flow_not_found", matched)
        if flow.expires_at <= self._clock.now():
            self._log.info(
                "hosted connect callback after the flow expired",
                extra=fields(user_id=flow.user_id, upstream=name),
            )
            return Outcome(FAILED, name, "flow_expired", matched)
        if error:
            reason = error if error in rfc6749.ALLOWED_AUTHORIZE_ERROR_CODES else "authorization_error"
            self._log.info(
                "connect flow denied", extra=fields(user_id=flow.user_id, upstream=name, error=reason)
            )
            self._audit.record(
                "deny", "success", user=flow.user_id, upstream=name, reason=reason, method=_METHOD
            )
            return Outcome(DENIED, name, reason, matched)
        try:
            validation.code(code)
            await self._service.finish_flow(upstream, flow, code, iss, callback)
        except BrokerError as exc:
            self._log.warning(
                "hosted connect callback failed",
                extra=fields(user_id=flow.user_id, upstream=name, error=exc.code),
            )
            self._audit.record(
                "acquire", "failure", user=flow.user_id, upstream=name, reason=exc.code, method=_METHOD
            )
            return Outcome(FAILED, name, exc.code.lower(), matched)
        self._audit.record("acquire", "success", user=flow.user_id, upstream=name, method=_METHOD)
        return Outcome(CONNECTED, name, "", matched)


def _matching(stored: str | None, offered: Sequence[str]) -> str | None:
    """The offered hash equal to the stored one (compared in constant time), or None."""
    if stored is None:
        return None
    found = None
    for candidate in offered:
        if hmac.compare_digest(candidate.encode(), stored.encode()):
            found = candidate
    return found
