"""Caller rules against callers who send what is no upstream name: a clear INVALID_ARGUMENT
naming the field, never the value echoed back (nor a transport error for a huge one)."""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.callers import token_hash
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, BrokerFactory, error_info


@pytest.mark.parametrize(
    "upstream",
    ["y" * 100_000, "secret\x00\nat_abc123", "at_" + "Z" * 70, "gh'); --"],
    ids=["huge", "control", "too-long", "quote"],
)
async def test_a_restricted_caller_naming_no_upstream_gets_invalid_argument(
    make_broker: BrokerFactory, auth_server: AuthServer, upstream: str
) -> None:
    token = os.urandom(24).hex()
    client = auth_server.new_client(redirect_uri="https://app.test/callback")
    broker = await make_broker(
        client=client, callers=[{"name": "web", "token_sha256": token_hash(token), "upstreams": [UPSTREAM]}]
    )
    metadata = [("x-credential-broker-caller-token", token)]
    for call in (
        broker.stub.Resolve(pb.ResolveRequest(user_id="alice", upstream=upstream), metadata=metadata),
        broker.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream=upstream), metadata=metadata
        ),
        broker.stub.Disconnect(pb.DisconnectRequest(user_id="alice", upstream=upstream), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert error_info(info.value).reason == "INVALID_ARGUMENT"
        details = info.value.details()
        assert details.startswith("upstream:") and len(details) < 200
        assert upstream not in details and "at_" not in details and "secret" not in details
    # A well-formed name the caller may not use still says who and what.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.stub.Resolve(pb.ResolveRequest(user_id="alice", upstream="other"), metadata=metadata)
    assert error_info(refused.value).reason == "CALLER_NOT_PERMITTED"
    assert refused.value.details() == "caller 'web' may not use upstream 'other'"
    audit = repr(broker.extra["audit"].events)
    assert "secret" not in audit and "y" * 300 not in audit
    answer = await health_pb2_grpc.HealthStub(broker.channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
