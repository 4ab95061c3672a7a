"""Client for the credential-broker sidecar.

    from credential_broker_client import BrokerClient, NotConnected

    with BrokerClient(cache=True) as broker:
        try:
            credential = broker.resolve("alice", "github")
        except NotConnected as exc:
            redirect(exc.authorization_url)

``BrokerClient`` (blocking) and ``AsyncBrokerClient`` (asyncio) cover every RPC, answer with
plain dataclasses, raise one error class per ErrorInfo reason, retry UNAVAILABLE within the
call's deadline, and with ``cache=True`` answer from a push-invalidated cache. ``BrokerAuth``
(httpx) and ``BrokerRequestsAuth`` (requests) put the header on upstream requests and retry a
401 once with a fresh token; they load only when used, so httpx and requests stay optional.
"""

from __future__ import annotations

from typing import Any

from credential_broker_client._common import outgoing_metadata
from credential_broker_client.aio import AsyncBrokerClient
from credential_broker_client.cache import CredentialCache
from credential_broker_client.client import BrokerClient
from credential_broker_client.errors import (
    BrokerError,
    CallerNotPermitted,
    CallerUnauthenticated,
    Cancelled,
    ClientAssertionUnavailable,
    ConnectRequired,
    DeadlineExceeded,
    DecryptionFailed,
    FlowNotFound,
    IdentityProviderUnavailable,
    InsufficientScope,
    InternalError,
    InvalidArgument,
    IssuerMismatch,
    MissingRequestHeader,
    ModeNotImplemented,
    NotConnected,
    PermissionDenied,
    PolicyDenied,
    ReconnectRequired,
    ResourceExhausted,
    StoreUnavailable,
    SubjectTokenRequired,
    TokenRequestRejected,
    TooManyPendingFlows,
    Unauthenticated,
    Unavailable,
    UnknownUpstream,
    UnsupportedTokenType,
    UpstreamUnavailable,
    UserMismatch,
    UserTokenInvalid,
    WatchResyncRequired,
    WatchTooSlow,
)
from credential_broker_client.models import (
    AuthorizationRequest,
    Connection,
    ConnectionEvent,
    Credential,
    CredentialInfo,
    Disconnection,
    TokenRevocation,
    UpstreamDisconnection,
)

__all__ = [
    "AsyncBrokerClient",
    "AuthorizationRequest",
    "BrokerAuth",
    "BrokerClient",
    "BrokerError",
    "BrokerRequestsAuth",
    "CallerNotPermitted",
    "CallerUnauthenticated",
    "Cancelled",
    "ClientAssertionUnavailable",
    "ConnectRequired",
    "Connection",
    "ConnectionEvent",
    "Credential",
    "CredentialCache",
    "CredentialInfo",
    "DeadlineExceeded",
    "DecryptionFailed",
    "Disconnection",
    "FlowNotFound",
    "IdentityProviderUnavailable",
    "InsufficientScope",
    "InternalError",
    "InvalidArgument",
    "IssuerMismatch",
    "MissingRequestHeader",
    "ModeNotImplemented",
    "NotConnected",
    "PermissionDenied",
    "PolicyDenied",
    "ReconnectRequired",
    "ResourceExhausted",
    "StoreUnavailable",
    "SubjectTokenRequired",
    "TokenRequestRejected",
    "TokenRevocation",
    "TooManyPendingFlows",
    "Unauthenticated",
    "Unavailable",
    "UnknownUpstream",
    "UnsupportedTokenType",
    "UpstreamDisconnection",
    "UpstreamUnavailable",
    "UserMismatch",
    "UserTokenInvalid",
    "WatchResyncRequired",
    "WatchTooSlow",
    "outgoing_metadata",
]


def __getattr__(name: str) -> Any:
    if name == "BrokerAuth":
        from credential_broker_client.httpx_auth import BrokerAuth

        return BrokerAuth
    if name == "BrokerRequestsAuth":
        from credential_broker_client.requests_auth import BrokerRequestsAuth

        return BrokerRequestsAuth
    raise AttributeError(name)
