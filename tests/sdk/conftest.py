"""Helpers for the SDK tests: the SDKs talk to a real broker (in-process on loopback gRPC, or
``broker serve`` processes) and the real loopback authorization server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from credential_broker_client import AsyncBrokerClient, BrokerClient
from credential_broker_client.models import CredentialInfo

from tests.authserver import AuthServer
from tests.brokerproc import ServerProcess
from tests.conftest import UPSTREAM, Broker

T = TypeVar("T")


def target(broker: Broker) -> str:
    return str(broker.app.server.addresses[0])


def socket_target(broker: Broker) -> str:
    return f"unix://{broker.tmp}/broker.sock"


def connect(client: BrokerClient, auth: AuthServer, user: str, upstream: str = UPSTREAM) -> CredentialInfo:
    """A whole connect flow through the sync SDK and the authorization server's endpoint."""
    started = client.build_authorization_url(user, upstream)
    callback = auth.authorize(started.authorization_url, user)
    assert callback["state"] == started.state
    return client.complete(callback["state"], callback["code"], user)


async def connect_async(
    client: AsyncBrokerClient, auth: AuthServer, user: str, upstream: str = UPSTREAM
) -> None:
    started = await client.build_authorization_url(user, upstream)
    callback = await asyncio.to_thread(auth.authorize, started.authorization_url, user)
    await client.complete(callback["state"], callback["code"], user)


def resolve_count(broker: Broker, user: str) -> int:
    """Resolve calls the broker answered for ``user`` (from its audit trail)."""
    return sum(1 for e in broker.extra["audit"].events if e.action == "inject" and e.user == user)


async def eventually(check: Callable[[], Any], timeout: float = 5.0, step: float = 0.01) -> float:
    """Poll a blocking ``check`` (in a thread) until it returns true; the seconds it took."""
    start = time.monotonic()
    while True:
        if await asyncio.to_thread(check):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(step)


class PatientServerProcess(ServerProcess):
    """A ``broker serve`` process given a minute to start: the shared CI machine is often busy."""

    def _wait_serving(self, timeout: float = 60.0) -> str:
        return super()._wait_serving(timeout)
