"""Server plumbing: reflection, health, graceful stop."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import Broker


async def test_reflection_lists_the_services(broker: Broker) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(broker.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=(("x-credential-broker-request", "true"),),
    )
    names = set()
    async for answer in call:
        names = {s.name for s in answer.list_services_response.service}
        break
    assert {"credentialbroker.v1.CredentialBroker", "grpc.health.v1.Health"} <= names


async def test_health_per_service(broker: Broker) -> None:
    health = health_pb2_grpc.HealthStub(broker.channel)
    for name in ("", "credentialbroker.v1.CredentialBroker"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_graceful_stop_flips_health_then_finishes_in_flight_calls(broker: Broker) -> None:
    await broker.connect("alice")
    broker.clock.advance(3600)
    broker.auth.fail_next("timeout", seconds=1)  # the refresh behind this Resolve takes a second
    watch = health_pb2_grpc.HealthStub(broker.channel).Watch(health_pb2.HealthCheckRequest(service=""))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    in_flight = asyncio.ensure_future(broker.resolve("alice"))
    await asyncio.sleep(0.2)
    stopping = asyncio.ensure_future(broker.app.server.stop(grace=5))
    flipped = await watch.read()
    assert flipped.status == health_pb2.HealthCheckResponse.NOT_SERVING
    resolved = await in_flight
    assert resolved.access_token
    await stopping
