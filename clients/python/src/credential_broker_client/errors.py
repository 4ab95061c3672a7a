"""Typed errors: one class per ErrorInfo reason the broker sends, read from the call's
``grpc-status-details-bin`` trailer (a ``google.rpc.Status`` with a ``google.rpc.ErrorInfo``).

    BrokerError                    .reason, .metadata, .code (grpc.StatusCode), .message
    ├── InvalidArgument            INVALID_ARGUMENT
    │   └── IssuerMismatch             ISSUER_MISMATCH
    ├── Unauthenticated            UNAUTHENTICATED
    │   ├── SubjectTokenRequired       SUBJECT_TOKEN_REQUIRED
    │   ├── UserTokenInvalid           USER_TOKEN_INVALID (.problem)
    │   ├── MissingRequestHeader       MISSING_REQUEST_HEADER
    │   └── CallerUnauthenticated      CALLER_UNAUTHENTICATED
    ├── PermissionDenied           PERMISSION_DENIED
    │   ├── UserMismatch               USER_MISMATCH
    │   ├── PolicyDenied               POLICY_DENIED
    │   └── CallerNotPermitted         CALLER_NOT_PERMITTED
    ├── UnknownUpstream            UPSTREAM_NOT_FOUND
    ├── FlowNotFound               FLOW_NOT_FOUND
    ├── ConnectRequired            CONNECT_REQUIRED (.upstream, .authorization_url)
    │   ├── NotConnected               NOT_CONNECTED
    │   ├── ReconnectRequired          RECONNECT_REQUIRED
    │   └── InsufficientScope          INSUFFICIENT_SCOPE (.missing_scopes)
    ├── TokenRequestRejected       TOKEN_REQUEST_REJECTED (.http_status, .oauth_error)
    ├── Unavailable                UNAVAILABLE (the broker unreachable; retried for you)
    │   ├── UpstreamUnavailable        UPSTREAM_UNAVAILABLE
    │   │   ├── IdentityProviderUnavailable  IDENTITY_PROVIDER_UNAVAILABLE
    │   │   ├── UnsupportedTokenType         UNSUPPORTED_TOKEN_TYPE
    │   │   └── ClientAssertionUnavailable   CLIENT_ASSERTION_UNAVAILABLE
    │   └── StoreUnavailable           STORE_UNAVAILABLE
    ├── ResourceExhausted          RESOURCE_EXHAUSTED
    │   ├── TooManyPendingFlows        TOO_MANY_PENDING_FLOWS
    │   └── WatchTooSlow               WATCH_TOO_SLOW
    ├── WatchResyncRequired        WATCH_RESYNC_REQUIRED (OUT_OF_RANGE: resume point deleted)
    ├── ModeNotImplemented         MODE_NOT_IMPLEMENTED
    ├── DeadlineExceeded           DEADLINE_EXCEEDED (the caller's deadline passed)
    ├── Cancelled                  CANCELLED
    └── InternalError              INTERNAL and anything unrecognised
        └── DecryptionFailed           DECRYPTION_FAILED

A reason this version does not know maps to the class of its gRPC status code, so an older
client still tells "reconnect" from "retry later". Messages are the broker's, which never carry
a token; the client adds none.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from credential_broker_client._proto.credential_broker_client import rpc_status_pb2

DOMAIN = "credentialbroker"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"


class BrokerError(Exception):
    """Base of every error the client raises. ``reason`` is the broker's stable ErrorInfo
    reason (or the status code name when it sent none); ``metadata`` its ErrorInfo metadata."""

    default_reason = "INTERNAL"
    default_code = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.code = code or self.default_code

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r})"


class InvalidArgument(BrokerError):
    default_reason = "INVALID_ARGUMENT"
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class IssuerMismatch(InvalidArgument):
    default_reason = "ISSUER_MISMATCH"


class Unauthenticated(BrokerError):
    default_reason = "UNAUTHENTICATED"
    default_code = grpc.StatusCode.UNAUTHENTICATED


class SubjectTokenRequired(Unauthenticated):
    default_reason = "SUBJECT_TOKEN_REQUIRED"


class UserTokenInvalid(Unauthenticated):
    """The user's token failed verification; ``problem`` says how (``expired``, ``audience``...)."""

    default_reason = "USER_TOKEN_INVALID"

    @property
    def problem(self) -> str:
        return self.metadata.get("problem", "")


class MissingRequestHeader(Unauthenticated):
    default_reason = "MISSING_REQUEST_HEADER"


class CallerUnauthenticated(Unauthenticated):
    default_reason = "CALLER_UNAUTHENTICATED"


class PermissionDenied(BrokerError):
    default_reason = "PERMISSION_DENIED"
    default_code = grpc.StatusCode.PERMISSION_DENIED


class UserMismatch(PermissionDenied):
    default_reason = "USER_MISMATCH"


class PolicyDenied(PermissionDenied):
    default_reason = "POLICY_DENIED"


class CallerNotPermitted(PermissionDenied):
    default_reason = "CALLER_NOT_PERMITTED"


class UnknownUpstream(BrokerError):
    default_reason = "UPSTREAM_NOT_FOUND"
    default_code = grpc.StatusCode.NOT_FOUND


class FlowNotFound(BrokerError):
    default_reason = "FLOW_NOT_FOUND"
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ConnectRequired(BrokerError):
    """The user must (re)connect: send their browser to ``authorization_url``."""

    default_reason = "CONNECT_REQUIRED"
    default_code = grpc.StatusCode.FAILED_PRECONDITION

    @property
    def authorization_url(self) -> str:
        return self.metadata.get("authorization_url", "")

    @property
    def upstream(self) -> str:
        return self.metadata.get("upstream", "")


class NotConnected(ConnectRequired):
    default_reason = "NOT_CONNECTED"


class ReconnectRequired(ConnectRequired):
    default_reason = "RECONNECT_REQUIRED"


class InsufficientScope(ConnectRequired):
    """The stored grant lacks ``missing_scopes``; ``authorization_url`` asks for the union."""

    default_reason = "INSUFFICIENT_SCOPE"

    @property
    def missing_scopes(self) -> tuple[str, ...]:
        raw = self.metadata.get("missing_scopes", "")
        return tuple(s for s in raw.replace(",", " ").split() if s)


class TokenRequestRejected(BrokerError):
    default_reason = "TOKEN_REQUEST_REJECTED"
    default_code = grpc.StatusCode.FAILED_PRECONDITION

    @property
    def http_status(self) -> int | None:
        raw = self.metadata.get("http_status", "")
        # ASCII only: str.isdigit also accepts digits such as "²" that int() refuses.
        return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 3 else None

    @property
    def oauth_error(self) -> str:
        return self.metadata.get("oauth_error", "")


class Unavailable(BrokerError):
    """UNAVAILABLE: the broker (or what it depends on) could not answer now. Retried by the
    client within the call's deadline before it is raised."""

    default_reason = "UNAVAILABLE"
    default_code = grpc.StatusCode.UNAVAILABLE


class UpstreamUnavailable(Unavailable):
    default_reason = "UPSTREAM_UNAVAILABLE"


class IdentityProviderUnavailable(UpstreamUnavailable):
    default_reason = "IDENTITY_PROVIDER_UNAVAILABLE"


class UnsupportedTokenType(UpstreamUnavailable):
    default_reason = "UNSUPPORTED_TOKEN_TYPE"


class ClientAssertionUnavailable(UpstreamUnavailable):
    """The JWT in the upstream's ``client_assertion_file`` could not be used; nothing was sent."""

    default_reason = "CLIENT_ASSERTION_UNAVAILABLE"


class StoreUnavailable(Unavailable):
    default_reason = "STORE_UNAVAILABLE"


class ResourceExhausted(BrokerError):
    default_reason = "RESOURCE_EXHAUSTED"
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooManyPendingFlows(ResourceExhausted):
    default_reason = "TOO_MANY_PENDING_FLOWS"


class WatchTooSlow(ResourceExhausted):
    default_reason = "WATCH_TOO_SLOW"


class WatchResyncRequired(BrokerError):
    """A watch asked to resume after a sequence the broker no longer keeps: events were missed.
    Read the state again (list_connections) and watch from now on."""

    default_reason = "WATCH_RESYNC_REQUIRED"
    default_code = grpc.StatusCode.OUT_OF_RANGE


class ModeNotImplemented(BrokerError):
    default_reason = "MODE_NOT_IMPLEMENTED"
    default_code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(BrokerError):
    default_reason = "DEADLINE_EXCEEDED"
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(BrokerError):
    default_reason = "CANCELLED"
    default_code = grpc.StatusCode.CANCELLED


class InternalError(BrokerError):
    default_reason = "INTERNAL"
    default_code = grpc.StatusCode.INTERNAL


class DecryptionFailed(InternalError):
    default_reason = "DECRYPTION_FAILED"


BY_REASON: dict[str, type[BrokerError]] = {
    cls.default_reason: cls
    for cls in (
        InvalidArgument,
        IssuerMismatch,
        Unauthenticated,
        SubjectTokenRequired,
        UserTokenInvalid,
        MissingRequestHeader,
        CallerUnauthenticated,
        PermissionDenied,
        UserMismatch,
        PolicyDenied,
        CallerNotPermitted,
        UnknownUpstream,
        FlowNotFound,
        ConnectRequired,
        NotConnected,
        ReconnectRequired,
        InsufficientScope,
        TokenRequestRejected,
        Unavailable,
        UpstreamUnavailable,
        IdentityProviderUnavailable,
        UnsupportedTokenType,
        ClientAssertionUnavailable,
        StoreUnavailable,
        ResourceExhausted,
        TooManyPendingFlows,
        WatchTooSlow,
        WatchResyncRequired,
        ModeNotImplemented,
        DeadlineExceeded,
        Cancelled,
        InternalError,
        DecryptionFailed,
    )
}

BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: UnknownUpstream,
    grpc.StatusCode.FAILED_PRECONDITION: BrokerError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNIMPLEMENTED: ModeNotImplemented,
    grpc.StatusCode.OUT_OF_RANGE: WatchResyncRequired,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_info(trailing_metadata: object) -> tuple[str, dict[str, str]] | None:
    """The broker's (reason, metadata) from a call's trailing metadata, or None."""
    for key, value in trailing_metadata or ():  # type: ignore[attr-defined]
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = rpc_status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a garbled trailer is no ErrorInfo
            return None
        for detail in status.details:
            if detail.type_url != _ERROR_INFO_TYPE:
                continue
            info = rpc_status_pb2.ErrorInfo()
            try:
                info.ParseFromString(detail.value)
            except Exception:  # a garbled detail is no ErrorInfo
                return None
            if info.domain == DOMAIN:
                return info.reason, dict(info.metadata)
    return None


def from_rpc_error(exc: grpc.RpcError) -> BrokerError:
    """The typed error for a failed call (sync or grpc.aio)."""
    code: grpc.StatusCode = exc.code()
    message: str = exc.details() or code.name.lower()
    found = error_info(exc.trailing_metadata())
    if found is None:
        cls = BY_CODE.get(code, InternalError)
        return cls(message, reason=code.name, code=code)
    reason, metadata = found
    cls = BY_REASON.get(reason) or BY_CODE.get(code, InternalError)
    return cls(message, reason=reason, metadata=metadata, code=code)
