"""Bad input: a clear INVALID_ARGUMENT (or UNAUTHENTICATED), nothing stored, server keeps serving."""

from __future__ import annotations

import sqlite3
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import UPSTREAM, Broker

BIG = "u" * 1_000_000
GOOD_STATE = "S" * 43

CASES: list[tuple[str, Any, grpc.StatusCode, str]] = [
    (
        "BuildAuthorizationURL",
        pb.BuildAuthorizationURLRequest(user_id="", upstream=UPSTREAM),
        grpc.StatusCode.UNAUTHENTICATED,
        "user_id",
    ),
    (
        "BuildAuthorizationURL",
        pb.BuildAuthorizationURLRequest(user_id=BIG, upstream=UPSTREAM),
        grpc.StatusCode.INVALID_ARGUMENT,
        "user_id",
    ),
    (
        "BuildAuthorizationURL",
        pb.BuildAuthorizationURLRequest(user_id="a\x00b", upstream=UPSTREAM),
        grpc.StatusCode.INVALID_ARGUMENT,
        "user_id",
    ),
    (
        "BuildAuthorizationURL",
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream=""),
        grpc.StatusCode.INVALID_ARGUMENT,
        "upstream",
    ),
    (
        "BuildAuthorizationURL",
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream="../../etc"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "upstream",
    ),
    (
        "BuildAuthorizationURL",
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream="x" * 100_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "upstream",
    ),
    (
        "Complete",
        pb.CompleteRequest(state="", code="c", user_id="alice"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "state",
    ),
    (
        "Complete",
        pb.CompleteRequest(state=GOOD_STATE, code="", user_id="alice"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "code",
    ),
    (
        "Complete",
        pb.CompleteRequest(state=GOOD_STATE, code=BIG, user_id="alice"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "code",
    ),
    (
        "Complete",
        pb.CompleteRequest(state="s p a c e", code="c", user_id="alice"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "state",
    ),
    (
        "Complete",
        pb.CompleteRequest(state=BIG, code="c", user_id="alice"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "state",
    ),
    (
        "Complete",
        pb.CompleteRequest(state=GOOD_STATE, code="c", user_id=""),
        grpc.StatusCode.UNAUTHENTICATED,
        "user_id",
    ),
    (
        "Complete",
        pb.CompleteRequest(state=GOOD_STATE, code="c\u202e", user_id="alice"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "code",
    ),
    ("Deny", pb.DenyRequest(state="", error="access_denied"), grpc.StatusCode.INVALID_ARGUMENT, "state"),
    ("Deny", pb.DenyRequest(state=GOOD_STATE, error=""), grpc.StatusCode.INVALID_ARGUMENT, "error"),
    ("Deny", pb.DenyRequest(state=GOOD_STATE, error='bad"quote'), grpc.StatusCode.INVALID_ARGUMENT, "error"),
    (
        "Deny",
        pb.DenyRequest(state=GOOD_STATE, error="access_denied", error_description=BIG),
        grpc.StatusCode.INVALID_ARGUMENT,
        "error_description",
    ),
    ("Refresh", pb.RefreshRequest(user_id="", upstream=UPSTREAM), grpc.StatusCode.UNAUTHENTICATED, "user_id"),
    (
        "Refresh",
        pb.RefreshRequest(user_id=BIG, upstream=UPSTREAM),
        grpc.StatusCode.INVALID_ARGUMENT,
        "user_id",
    ),
    (
        "Refresh",
        pb.RefreshRequest(user_id="alice", upstream="\x7f"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "upstream",
    ),
    (
        "Resolve",
        pb.ResolveRequest(user_id=BIG, upstream=UPSTREAM),
        grpc.StatusCode.INVALID_ARGUMENT,
        "user_id",
    ),
    (
        "Resolve",
        pb.ResolveRequest(user_id=" alice", upstream=UPSTREAM),
        grpc.StatusCode.INVALID_ARGUMENT,
        "user_id",
    ),
    (
        "Resolve",
        pb.ResolveRequest(user_id="alice", upstream=UPSTREAM, subject_token=BIG),
        grpc.StatusCode.INVALID_ARGUMENT,
        "subject_token",
    ),
    (
        "Resolve",
        pb.ResolveRequest(user_id="alice", upstream=UPSTREAM, min_valid_seconds=10**9),
        grpc.StatusCode.INVALID_ARGUMENT,
        "min_valid_seconds",
    ),
    ("Resolve", pb.ResolveRequest(user_id="", upstream=""), grpc.StatusCode.UNAUTHENTICATED, "user_id"),
]


def _counts(broker: Broker) -> tuple[int, int]:
    conn = sqlite3.connect(broker.db_path)
    try:
        return (
            conn.execute("SELECT COUNT(*) FROM credentials").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM pending_flows").fetchone()[0],
        )
    finally:
        conn.close()


@pytest.mark.parametrize(("method", "request_", "code", "field"), CASES)
async def test_bad_fields_are_rejected_clearly(
    broker: Broker, method: str, request_: Any, code: grpc.StatusCode, field: str
) -> None:
    before = _counts(broker)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(broker.stub, method)(request_)
    assert info.value.code() == code
    assert info.value.details().startswith(f"{field}:")
    assert len(info.value.details()) < 200
    assert _counts(broker) == before
    health = health_pb2_grpc.HealthStub(broker.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_garbage_bytes_and_oversized_messages(broker: Broker) -> None:
    garbage = broker.channel.unary_unary(
        "/credentialbroker.v1.CredentialBroker/Resolve",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await garbage(b"\xff\xff\xff\xff\x0f not protobuf")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request: not a valid credentialbroker.v1.ResolveRequest message"
    with pytest.raises(grpc.aio.AioRpcError) as huge:
        await broker.resolve("u" * (5 * 1024 * 1024))
    assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await broker.connect("alice")
    assert (await broker.resolve("alice")).access_token
