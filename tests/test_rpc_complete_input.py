"""Complete with a malformed field leaves the flow alone: every field is checked before the state
is consumed, so the caller can fix its request and complete the user's login."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import Broker, error_info


@pytest.mark.parametrize(
    "iss", ["https://issuer.test/" + "x" * 2048, "https://issuer.test/\x00"], ids=["long", "nul"]
)
async def test_a_malformed_iss_does_not_consume_the_flow(broker: Broker, iss: str) -> None:
    started = await broker.start_flow()
    callback = await asyncio.to_thread(broker.auth.authorize, started.authorization_url, "alice")
    request = pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice", iss=iss)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(info.value).reason == "INVALID_ARGUMENT"
    assert info.value.details().startswith("iss:") and len(info.value.details()) < 200
    assert broker.auth.token_requests("authorization_code") == []
    done = await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice")
    )
    assert done.credential.user_id == "alice"
