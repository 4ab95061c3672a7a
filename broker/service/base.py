"""What every use case of the broker service shares: the constructor (configuration, vault,
token client, clock, single flights, policy, the refresh lease's owner and length) and the
lookups of configured upstreams. Each use case is a subclass of ``ServiceBase`` in its own
module; ``BrokerService`` (broker/service/composed.py) combines them.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from broker import connection_values, validation
from broker.audit import Auditor
from broker.clock import Clock
from broker.config import BrokerConfig, Mode, UpstreamConfig
from broker.errors import (
    NotConnected,
    NotImplementedMode,
    ReconnectRequired,
    SubjectTokenRequired,
    UnknownUpstream,
)
from broker.exchange import TokenExchanger
from broker.logs import get_logger
from broker.models import AuthorizationRequest, Credential, CredentialInfo
from broker.oauth import client_auth, rfc9126
from broker.oauth.client import ClientCredentials, TokenEndpointClient
from broker.oauth.rfc6749 import TokenResponse
from broker.policy import AllowAll, PolicyEnforcer
from broker.singleflight import SingleFlight
from broker.usage import UsageStamps
from broker.vault import CredentialVault

# A refresh lease runs this much longer than the token request made under it, for the store
# write that follows the answer (see BrokerService._refresh).
_LEASE_MARGIN_SECONDS = 5.0


class ServiceBase:
    """State and lookups shared by the connect flow, refresh and resolve use cases."""

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

    # -- mapping -------------------------------------------------------------------------

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

    if TYPE_CHECKING:
        # Implemented by the use case named on each; declared here because another use case
        # calls it (mypy checks each implementation against its declaration).

        # broker/service/connect_flow.py
        async def _flow_for_answer(
            self, user: str, upstream: UpstreamConfig, asked: tuple[str, ...] = ()
        ) -> AuthorizationRequest | None: ...

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
        ) -> Credential: ...

        # broker/service/refresh.py
        async def _renew_exchanged(self, user: str, upstream: UpstreamConfig, window: int) -> Credential: ...

        async def _audited_refresh(
            self,
            user: str,
            upstream: UpstreamConfig,
            window: int | None,
            due: Callable[[Credential, float], bool] | None = None,
        ) -> Credential: ...

        async def _request(
            self,
            upstream: UpstreamConfig,
            form: Sequence[tuple[str, str]],
            user: str,
            deadline: float | None = None,
            params: connection_values.Pairs = (),
        ) -> TokenResponse: ...

        # broker/service/resolve.py
        def _refreshed_recently(self, credential: Credential, now: float) -> bool: ...

        def _load(self, user: str, upstream: UpstreamConfig, recent: bool = False) -> Credential | None: ...

        async def _read(
            self, user: str, upstream: UpstreamConfig, recent: bool = False
        ) -> Credential | None: ...

        async def _connect_error(
            self,
            kind: type[NotConnected] | type[ReconnectRequired],
            user: str,
            upstream: UpstreamConfig,
            required: tuple[str, ...] = (),
        ) -> NotConnected | ReconnectRequired | SubjectTokenRequired: ...
