"""Typed errors: every ErrorInfo reason the broker sends reaches the Python SDK, over a real gRPC
call with the broker's own status encoding, as its own exported class, in the family of its
gRPC status code and under the class of its parent reason in the broker's tree."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import credential_broker_client
import grpc
import pytest
from credential_broker_client import errors as sdk

import broker.scopes  # noqa: F401 - InsufficientScope joins the broker's error tree
from broker import errors
from broker.rpc.status import status_code_for, to_status

# Raised at start-up or by the `keys` CLI only: never the answer to an RPC.
NOT_SENT = {
    "CONFIG_INVALID",
    "KEYRING_INVALID",
    "ROOT_KEY_UNAVAILABLE",
    "ROOT_KEY_REFUSED",
    "KEY_ROTATION_REFUSED",
}


def _broker_error_classes() -> list[type[errors.BrokerError]]:
    found, todo = [], [errors.BrokerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls.code not in NOT_SENT]


def _instance(cls: type[errors.BrokerError]) -> errors.BrokerError:
    """An error of that class without its own arguments: only its reason and code matter here."""
    error = cls.__new__(cls)
    errors.BrokerError.__init__(error, f"a {cls.code} error")
    return error


@pytest.fixture
def raising() -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """A gRPC method that fails with the broker's status for the reason it is sent."""
    by_reason = {cls.code: cls for cls in _broker_error_classes()}

    def fail(request: bytes, context: grpc.ServicerContext) -> None:
        context.abort_with_status(to_status(_instance(by_reason[request.decode()])))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Errors", {"Fail": grpc.unary_unary_rpc_method_handler(fail)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel.unary_unary("/test.Errors/Fail")
    server.stop(None)


def test_each_broker_reason_has_its_own_class(raising: grpc.UnaryUnaryMultiCallable) -> None:
    classes = _broker_error_classes()
    assert {"CLIENT_ASSERTION_UNAVAILABLE", "INSUFFICIENT_SCOPE", "DECRYPTION_FAILED"} <= {
        c.code for c in classes
    }
    for cls in classes:
        with pytest.raises(grpc.RpcError) as failed:
            raising(cls.code.encode(), timeout=10)
        error = sdk.from_rpc_error(failed.value)
        code = status_code_for(_instance(cls))
        assert (error.reason, error.code) == (cls.code, code)
        assert type(error).default_reason == cls.code, f"{cls.code} arrives as {type(error).__name__}"
        assert isinstance(error, sdk.BY_CODE.get(code, sdk.InternalError)), cls.code
        assert getattr(credential_broker_client, type(error).__name__) is type(error)
        assert type(error).__name__ in credential_broker_client.__all__
        parent = cls.__mro__[1]
        if parent not in (errors.BrokerError, Exception):
            assert isinstance(error, sdk.BY_REASON[parent.code]), f"{cls.code} not under {parent.code}"


@pytest.fixture
def odd_metadata() -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """A gRPC method that fails with TOKEN_REQUEST_REJECTED and the ErrorInfo metadata it is
    sent (as ``key=value`` lines): what a broker of another version, or a hostile one, may say."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    def fail(request: bytes, context: grpc.ServicerContext) -> None:
        metadata = dict(line.split("=", 1) for line in request.decode().splitlines())
        info = error_details_pb2.ErrorInfo(
            reason="TOKEN_REQUEST_REJECTED", domain=sdk.DOMAIN, metadata=metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="rejected")
        status.details.append(detail)
        context.abort_with_status(rpc_status.to_status(status))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Odd", {"Fail": grpc.unary_unary_rpc_method_handler(fail)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel.unary_unary("/test.Odd/Fail")
    server.stop(None)


@pytest.mark.parametrize("raw", ["\u00b2", "\u2460", "4\u00b9", "9" * 5000, "-1", "4 01", ""])
def test_an_odd_http_status_reads_as_none_never_raises(
    odd_metadata: grpc.UnaryUnaryMultiCallable, raw: str
) -> None:
    """``http_status`` is read in except blocks: a value that is no HTTP status (here Unicode
    digits str.isdigit accepts and int() refuses, or more digits than int() reads) must be
    None, not a ValueError there."""
    with pytest.raises(grpc.RpcError) as failed:
        odd_metadata(f"http_status={raw}\noauth_error=invalid_grant".encode(), timeout=10)
    error = sdk.from_rpc_error(failed.value)
    assert isinstance(error, sdk.TokenRequestRejected)
    assert error.http_status is None
    assert error.oauth_error == "invalid_grant"


def test_a_plain_http_status_is_read(odd_metadata: grpc.UnaryUnaryMultiCallable) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        odd_metadata(b"http_status=400", timeout=10)
    error = sdk.from_rpc_error(failed.value)
    assert isinstance(error, sdk.TokenRequestRejected) and error.http_status == 400
