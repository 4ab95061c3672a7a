"""The Python SDK against a broker that verifies user tokens (an ``identity:`` section) and a real
OpenID Connect provider: every user-scoped RPC refuses a call without the user's token, works
through both clients with ``user_token=`` (sent as ``authorization: Bearer``), refuses another
user's token, and the token shows up in no exception, repr or log line."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import requests
from credential_broker_client import (
    AsyncBrokerClient,
    BrokerAuth,
    BrokerClient,
    BrokerError,
    BrokerRequestsAuth,
    CallerUnauthenticated,
    ConnectionEvent,
    Unauthenticated,
    UserMismatch,
    UserTokenInvalid,
)

from broker.callers import token_hash
from tests import leakcheck
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, UPSTREAM, Broker, BrokerFactory, upstream_doc
from tests.idp import IdentityProvider
from tests.test_identity import identity_doc

from .conftest import resolve_count, socket_target, target
from .upstream_api import UpstreamAPI

SDK_LOGGER = "credential_broker_client"


@pytest.fixture
async def ibroker(make_broker: BrokerFactory, auth_server: AuthServer, idp: IdentityProvider) -> Broker:
    """A broker that verifies user tokens from the loopback IdP."""
    client = auth_server.new_client(redirect_uri=REDIRECT_URI)
    return await make_broker(
        client=client, upstreams=[upstream_doc(auth_server, client)], identity=identity_doc(idp)
    )


class Client:
    """One surface over both SDK clients for these tests: every method is awaited (the sync
    client's in a thread, as the in-process broker shares the event loop)."""

    def __init__(self, sync: BrokerClient | None = None, aio: AsyncBrokerClient | None = None) -> None:
        self.sync, self.aio = sync, aio

    def __repr__(self) -> str:
        return repr(self.sync or self.aio)

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if self.aio is not None:
            return getattr(self.aio, name)  # type: ignore[no-any-return]
        method = getattr(self.sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

    async def events(self, count: int, user_id: str, **kwargs: Any) -> list[ConnectionEvent]:
        """The first ``count`` events of a watch for one user."""
        if self.aio is not None:
            found: list[ConnectionEvent] = []
            stream = self.aio.watch(user_id, **kwargs)
            try:
                async for event in stream:
                    found.append(event)
                    if len(found) == count:
                        break
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            return found
        assert self.sync is not None
        sync = self.sync

        def take() -> list[ConnectionEvent]:
            stream = sync.watch(user_id, **kwargs)
            try:
                return [next(stream) for _ in range(count)]
            finally:
                stream.close()

        return await asyncio.to_thread(take)


@pytest.fixture(params=["sync", "async"])
async def sdk(request: pytest.FixtureRequest, ibroker: Broker) -> AsyncIterator[Client]:
    if request.param == "sync":
        with BrokerClient(target(ibroker)) as sync:
            yield Client(sync=sync)
    else:
        async with AsyncBrokerClient(socket_target(ibroker)) as aio:
            yield Client(aio=aio)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every log record at DEBUG and up, the SDK's included."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger=SDK_LOGGER)
    return caplog


def token_for(idp: IdentityProvider, user: str, **claims: Any) -> str:
    token = idp.sign(idp.claims(user, **claims), "rsa-1")
    leakcheck.add_secret(token)  # the suite-wide check looks for it in broker logs and statuses
    return token


def error_texts(error: BaseException) -> list[str]:
    texts = [str(error), repr(error), " ".join(map(str, error.args))]
    if isinstance(error, BrokerError):
        texts += [error.message, repr(error.metadata)]
    return texts


def assert_nowhere(secrets: list[str], texts: list[str]) -> None:
    assert texts
    for text in texts:
        leakcheck.observe_text(text, "sdk")
        for secret in secrets:
            assert secret not in text, f"a user token in SDK text: {text[:80]!r}"


def user_calls(client: Client, user_id: str, **token: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Every user-scoped RPC for ``user_id``, with ``token`` (``user_token=...``) or without."""
    return {
        "build_authorization_url": lambda: client.build_authorization_url(user_id, UPSTREAM, **token),
        "complete": lambda: client.complete("s" * 43, "code", user_id, **token),
        "refresh": lambda: client.refresh(user_id, UPSTREAM, **token),
        "list_connections": lambda: client.list_connections(user_id, **token),
        "resolve": lambda: client.resolve(user_id, UPSTREAM, **token),
        "disconnect": lambda: client.disconnect(user_id, UPSTREAM, **token),
        "disconnect_all": lambda: client.disconnect_all(user_id, **token),
        "watch": lambda: client.events(1, user_id, **token),
    }


async def connect(client: Client, auth: AuthServer, user_id: str, user_token: str) -> Any:
    started = await client.build_authorization_url(user_id, UPSTREAM, user_token=user_token)
    callback = await asyncio.to_thread(auth.authorize, started.authorization_url, user_id)
    assert callback["state"] == started.state
    return await client.complete(callback["state"], callback["code"], user_id, user_token=user_token)


async def test_without_a_user_token_every_user_rpc_is_unauthenticated(
    sdk: Client, ibroker: Broker, idp: IdentityProvider, captured: pytest.LogCaptureFixture
) -> None:
    """What the SDK could do before ``user_token``, and what a call that leaves it out gets."""
    for name, call in user_calls(sdk, "alice").items():
        with pytest.raises(UserTokenInvalid) as missing:
            await call()
        assert isinstance(missing.value, Unauthenticated), name
        assert (missing.value.reason, missing.value.problem) == ("USER_TOKEN_INVALID", "missing"), name
        assert missing.value.code.name == "UNAUTHENTICATED", name
    assert ibroker.auth.token_requests() == []


async def test_an_expired_user_token_is_user_token_invalid(
    sdk: Client, ibroker: Broker, idp: IdentityProvider, captured: pytest.LogCaptureFixture
) -> None:
    expired = token_for(idp, "alice", exp=int(ibroker.clock.now()) - 120)
    texts = [repr(sdk)]
    for name, call in user_calls(sdk, "alice", user_token=expired).items():
        with pytest.raises(UserTokenInvalid) as refused:
            await call()
        assert (refused.value.problem, refused.value.code.name) == ("expired", "UNAUTHENTICATED"), name
        texts += error_texts(refused.value)
    assert_nowhere([expired], [*texts, captured.text])
    assert ibroker.auth.token_requests() == []


async def test_every_user_rpc_works_with_the_user_token(
    sdk: Client, ibroker: Broker, idp: IdentityProvider, captured: pytest.LogCaptureFixture
) -> None:
    auth = ibroker.auth
    alice = token_for(idp, "alice")
    info = await connect(sdk, auth, "alice", alice)
    assert (info.user_id, info.upstream) == ("alice", UPSTREAM)
    credential = await sdk.resolve("alice", UPSTREAM, user_token=alice, min_valid_seconds=60)
    assert credential.access_token in auth.issued
    refreshed = await sdk.refresh("alice", UPSTREAM, user_token=alice)
    assert refreshed.upstream == UPSTREAM
    after = await sdk.resolve("alice", UPSTREAM, user_token=alice)
    assert after.access_token in auth.issued and after.access_token != credential.access_token
    # subject_token is still the field, and verified the same way.
    assert (await sdk.resolve("alice", UPSTREAM, subject_token=alice)).access_token == after.access_token
    [connection] = await sdk.list_connections("alice", user_token=alice)
    assert (connection.upstream, connection.status) == (UPSTREAM, "connected")
    events = await sdk.events(2, "alice", after_sequence=0, user_token=alice)
    assert [(e.kind, e.user_id, e.upstream) for e in events] == [
        ("CONNECTED", "alice", UPSTREAM),
        ("REFRESHED", "alice", UPSTREAM),
    ]
    assert (await sdk.disconnect("alice", UPSTREAM, user_token=alice)).deleted
    await connect(sdk, auth, "alice", alice)
    [result] = await sdk.disconnect_all("alice", user_token=alice)
    assert (result.upstream, result.deleted) == (UPSTREAM, True)
    [gone] = await sdk.list_connections("alice", user_token=alice)
    assert gone.status != "connected"
    assert_nowhere([alice], [repr(sdk), repr(info), repr(credential), repr(events), captured.text])


async def test_another_users_token_is_user_mismatch(
    sdk: Client, ibroker: Broker, idp: IdentityProvider, captured: pytest.LogCaptureFixture
) -> None:
    bob = token_for(idp, "bob")
    texts = [repr(sdk)]
    for name, call in user_calls(sdk, "alice", user_token=bob).items():
        with pytest.raises(UserMismatch) as mismatch:
            await call()
        assert mismatch.value.reason == "USER_MISMATCH", name
        assert mismatch.value.code.name == "PERMISSION_DENIED", name
        texts += error_texts(mismatch.value)
    # The same token is good for bob.
    assert (await sdk.build_authorization_url("bob", UPSTREAM, user_token=bob)).state
    assert_nowhere([bob], [*texts, captured.text])
    assert ibroker.auth.token_requests() == []


async def test_a_token_that_cannot_be_a_bearer_token_is_refused_before_sending(
    sdk: Client, ibroker: Broker, idp: IdentityProvider, captured: pytest.LogCaptureFixture
) -> None:
    """gRPC refuses such a header value with its own untyped error (grpc.aio): the SDK says so
    first, without echoing the value."""
    alice = token_for(idp, "alice")
    audited = len(ibroker.extra["audit"].events)
    texts = []
    for bad in (f"Bearer {alice}", f"{alice}\n", f"{alice}é"):
        for name, call in user_calls(sdk, "alice", user_token=bad).items():
            with pytest.raises(ValueError, match="user_token") as refused:
                await call()
            texts += error_texts(refused.value)
            assert not isinstance(refused.value, BrokerError), name
    assert_nowhere([alice], [*texts, captured.text])
    assert len(ibroker.extra["audit"].events) == audited  # nothing reached the broker


async def test_the_user_token_goes_with_the_caller_token(
    make_broker: BrokerFactory, auth_server: AuthServer, idp: IdentityProvider
) -> None:
    """With callers configured too, both tokens travel on the same call."""
    caller_token = os.urandom(24).hex()
    client_doc = auth_server.new_client(redirect_uri=REDIRECT_URI)
    broker = await make_broker(
        client=client_doc,
        upstreams=[upstream_doc(auth_server, client_doc)],
        identity=identity_doc(idp),
        callers=[{"name": "web", "token_sha256": token_hash(caller_token)}],
    )
    alice = token_for(idp, "alice")
    with BrokerClient(target(broker), caller_token=caller_token) as sync:
        assert await asyncio.to_thread(sync.list_connections, "alice", user_token=alice)
    async with AsyncBrokerClient(target(broker), caller_token=caller_token) as aio:
        assert await aio.list_connections("alice", user_token=alice)
    async with AsyncBrokerClient(target(broker)) as stranger:
        with pytest.raises(CallerUnauthenticated):
            await stranger.list_connections("alice", user_token=alice)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_cached_client_resolves_with_the_user_token_and_serves_nothing_from_memory(
    kind: str, ibroker: Broker, idp: IdentityProvider, captured: pytest.LogCaptureFixture
) -> None:
    """The cache's all-users watch is refused under identity: every resolve goes to the broker."""
    alice = token_for(idp, "alice")
    sync = BrokerClient(target(ibroker), cache=True) if kind == "sync" else None
    aio = AsyncBrokerClient(target(ibroker), cache=True) if kind == "async" else None
    client = Client(sync=sync, aio=aio)
    try:
        assert not await client.wait_cache_live(timeout=0.5)
        await connect(client, ibroker.auth, "alice", alice)
        first = await client.resolve("alice", UPSTREAM, user_token=alice)
        second = await client.resolve("alice", UPSTREAM, user_token=alice)
        assert first.access_token == second.access_token
        assert resolve_count(ibroker, "alice") == 2
        cache = (sync or aio).cache  # type: ignore[union-attr]
        assert cache is not None and not cache.live and len(cache) == 0 and cache.hits == 0
    finally:
        if sync is not None:
            await asyncio.to_thread(sync.close)
        if aio is not None:
            await aio.close()
    assert "credential cache dropped" in captured.text  # the refused watch, logged
    assert_nowhere([alice], [repr(client), captured.text])


async def test_the_http_auths_carry_the_user_token(
    ibroker: Broker, idp: IdentityProvider, captured: pytest.LogCaptureFixture
) -> None:
    """BrokerAuth (httpx, sync and async) and BrokerRequestsAuth resolve with the user's token,
    the 401 retry included, against a broker that verifies it."""
    alice = token_for(idp, "alice")
    async with AsyncBrokerClient(target(ibroker)) as aio:
        await connect(Client(aio=aio), ibroker.auth, "alice", alice)
        ibroker.clock.advance(31)  # past min_refresh_interval_seconds: the 401 gets a refresh
        with BrokerClient(target(ibroker)) as sync, UpstreamAPI() as api:

            def sync_calls() -> list[int]:
                with httpx.Client(auth=BrokerAuth(sync, "alice", UPSTREAM, user_token=alice)) as http:
                    first = http.get(api.url).status_code
                with requests.Session() as session:
                    auth = BrokerRequestsAuth(sync, "alice", UPSTREAM, user_token=alice)
                    return [first, session.get(api.url, auth=auth).status_code]

            statuses = await asyncio.to_thread(sync_calls)
            async with httpx.AsyncClient(auth=BrokerAuth(aio, "alice", UPSTREAM, user_token=alice)) as http:
                statuses.append((await http.get(api.url)).status_code)
            assert statuses == [200, 200, 200]
            assert all(seen.startswith("Bearer ") for seen in api.seen)
            assert len(api.seen) == 4  # the first request's 401, then one retry and two plain calls
    assert_nowhere([alice], [captured.text])
