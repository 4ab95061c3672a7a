"""One table from domain errors to gRPC status codes, with a google.rpc.ErrorInfo detail."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker import errors

DOMAIN = "credentialbroker"

# Checked in order: subclasses before their bases.
STATUS_TABLE: tuple[tuple[type[errors.BrokerError], grpc.StatusCode], ...] = (
    (errors.IssuerMismatch, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.MissingRequestHeader, grpc.StatusCode.UNAUTHENTICATED),
    (errors.CallerUnauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.CallerNotPermitted, grpc.StatusCode.PERMISSION_DENIED),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.SubjectTokenRequired, grpc.StatusCode.UNAUTHENTICATED),
    (errors.UserTokenInvalid, grpc.StatusCode.UNAUTHENTICATED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.UserMismatch, grpc.StatusCode.PERMISSION_DENIED),
    (errors.PolicyDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.UnknownUpstream, grpc.StatusCode.NOT_FOUND),
    (errors.FlowNotFound, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ConnectRequired, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.TokenRequestRejected, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.IdentityProviderUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.UpstreamUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreError, grpc.StatusCode.UNAVAILABLE),
    (errors.NotImplementedMode, grpc.StatusCode.UNIMPLEMENTED),
    (errors.DecryptionError, grpc.StatusCode.INTERNAL),
    (errors.KeyRotationRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.TooManyPendingFlows, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.WatcherTooSlow, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.WatchResyncRequired, grpc.StatusCode.OUT_OF_RANGE),
)


def status_code_for(error: errors.BrokerError) -> grpc.StatusCode:
    for kind, code in STATUS_TABLE:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(error: errors.BrokerError) -> grpc.Status:
    """The rich status for an error: code, the error's safe message, and ErrorInfo."""
    code = status_code_for(error)
    info = error_details_pb2.ErrorInfo(reason=error.code, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    return rpc_status.to_status(proto)


def internal_status() -> grpc.Status:
    """For an unexpected exception: nothing about it leaves the process."""
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN)
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[detail])
    return rpc_status.to_status(proto)
