"""Each provider quirk family end to end: the real gRPC server with ``provider: NAME`` and only
the endpoints pointed at a loopback emulator written from that provider's documentation.

For each: connect, Resolve, refresh (a new token from the right URL, in the right format) and
a dead grant, which must be RECONNECT_REQUIRED (the user is sent to reconnect), never
UNAVAILABLE (retried with backoff forever).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from tests.conftest import REDIRECT_URI, Broker, BrokerFactory, error_info
from tests.providers.atlassian import Atlassian
from tests.providers.emulator import CLIENT_ID, Emulator
from tests.providers.figma import Figma
from tests.providers.github import GitHub
from tests.providers.google import Google
from tests.providers.microsoft import Microsoft, MicrosoftTenant
from tests.providers.notion import Notion
from tests.providers.quickbooks import QuickBooks
from tests.providers.salesforce import Salesforce
from tests.providers.shopify import Shopify
from tests.providers.slack import Slack
from tests.providers.zendesk import Zendesk

EMULATORS: dict[str, type[Emulator]] = {
    "github-app": GitHub,
    "slack": Slack,
    "notion": Notion,
    "figma": Figma,
    "salesforce": Salesforce,
    "google": Google,
    "atlassian": Atlassian,
    "microsoft": Microsoft,
    "microsoft-tenant": MicrosoftTenant,
    "shopify": Shopify,
    "quickbooks": QuickBooks,
    "zendesk": Zendesk,
}
SCOPES = {
    "github-app": ["repo", "read:user"],
    "slack": ["chat:write", "search:read"],
    "google": ["openid", "email"],
    "atlassian": ["offline_access", "read:jira-work"],
    "shopify": ["read_products", "write_orders"],
    "zendesk": ["read", "write"],
}


@pytest.fixture(params=sorted(EMULATORS))
def emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    server = EMULATORS[request.param]().start()
    try:
        yield server
    finally:
        server.stop()


async def _broker(make_broker: BrokerFactory, emulator: Emulator) -> Broker:
    provider = emulator.provider
    auth: dict[str, Any] = {
        "provider": provider,
        "client_id": CLIENT_ID,
        "client_secret": emulator.client_secret,
        "redirect_uri": REDIRECT_URI,
        **emulator.endpoints(),
    }
    if provider in SCOPES:
        auth["scopes"] = SCOPES[provider]
    return await make_broker(
        upstreams=[{"name": "up", "url": "https://api.provider.test", "auth_broker": auth}]
    )


async def _connect(broker: Broker, emulator: Emulator, user: str = "alice") -> pb.CompleteResponse:
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(
            user_id=user, upstream="up", connection_params=emulator.connection_params
        )
    )
    assert started.authorization_url.startswith(emulator.base)
    callback = await asyncio.to_thread(emulator.authorize, started.authorization_url, user)
    assert callback["state"] == started.state
    # As an app does: the callback's other parameters go along (QuickBooks' realmId).
    others = {k: v for k, v in callback.items() if k not in ("code", "state")}
    return await broker.stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user, callback_params=others)
    )


async def _resolve(broker: Broker, user: str = "alice") -> pb.ResolveResponse:
    return await broker.stub.Resolve(pb.ResolveRequest(user_id=user, upstream="up"))


async def test_connect_resolve_refresh_and_dead_grant(make_broker: BrokerFactory, emulator: Emulator) -> None:
    broker = await _broker(make_broker, emulator)
    await _connect(broker, emulator)
    first = await _resolve(broker)
    assert first.access_token in emulator.minted  # the token the provider issued
    assert first.token_type == "Bearer"

    # Refresh: through Resolve once the token is due, else through the Refresh RPC.
    if first.HasField("expires_at"):
        broker.clock.advance(first.expires_at.seconds - broker.clock.now() + 1)
        second = await _resolve(broker)
    else:
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
        second = await _resolve(broker)
    assert second.access_token != first.access_token and second.access_token in emulator.minted
    refreshes = [r for r in emulator.token_requests() if _fields(r).get("grant_type") == "refresh_token"]
    assert len(refreshes) == 1

    # The user revokes the app at the provider: the next refresh is refused for good.
    emulator.kill_grants("alice")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if second.HasField("expires_at"):
            broker.clock.advance(second.expires_at.seconds - broker.clock.now() + 1)
            await _resolve(broker)
        else:
            await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
    assert error_info(info.value).reason == "RECONNECT_REQUIRED", info.value.details()
    # ...and stays so, without another request to the provider, with a way back.
    before = len(emulator.token_requests())
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await _resolve(broker)
    assert error_info(again.value).reason == "RECONNECT_REQUIRED"
    assert error_info(again.value).metadata["authorization_url"].startswith(emulator.base)
    assert len(emulator.token_requests()) == before
    # Reconnecting works.
    await _connect(broker, emulator)
    assert (await _resolve(broker)).access_token


def _fields(request: Any) -> dict[str, str]:
    if request.headers.get("content-type", "").startswith("application/json"):
        return {k: str(v) for k, v in json.loads(request.body).items()}
    return dict(parse_qsl(request.body.decode()))


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


@pytest.fixture
def github() -> Iterator[GitHub]:
    server = GitHub().start()
    yield server
    server.stop()


async def test_github_errors_sent_with_http_200_are_rejections(
    make_broker: BrokerFactory, github: GitHub
) -> None:
    broker = await _broker(make_broker, github)
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream="up")
    )
    assert _query(started.authorization_url)["scope"] == "repo,read:user"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code="code-never-issued", user_id="alice")
        )
    detail = error_info(info.value)
    assert (info.value.code(), detail.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TOKEN_REQUEST_REJECTED",
    )
    assert detail.metadata["oauth_error"] == "bad_verification_code"  # a code the preset declares
    assert detail.metadata["http_status"] == "200"
    assert "incorrect or expired" not in (info.value.details() or "")  # descriptions never pass
    # Form body with the secret in it, and JSON asked for (else GitHub answers a form).
    await _connect(broker, github)
    exchange = github.token_requests()[-1]
    assert exchange.headers["accept"] == "application/json"
    assert exchange.form()["client_secret"] == github.client_secret
    resolved = await _resolve(broker)
    assert list(resolved.scopes) == ["repo", "read:user"]  # "repo,read:user" in the answer


@pytest.fixture
def slack() -> Iterator[Slack]:
    server = Slack().start()
    yield server
    server.stop()


async def test_slack_user_token_from_authed_user(make_broker: BrokerFactory, slack: Slack) -> None:
    broker = await _broker(make_broker, slack)
    await _connect(broker, slack)
    asked = slack.authorization_requests()[-1].query
    assert asked["user_scope"] == "chat:write,search:read" and "scope" not in asked
    resolved = await _resolve(broker)
    assert resolved.access_token.startswith("xoxe.xoxp-")  # the user's, not the top-level bot token
    assert list(resolved.scopes) == ["chat:write", "search:read"]
    assert resolved.token_type == "Bearer"
    assert slack.token_requests()[-1].basic() == (CLIENT_ID, slack.client_secret)
    # ok: false on a bad code is a rejection, not an outage.
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="bob", upstream="up")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code="code-never-issued", user_id="bob")
        )
    assert error_info(info.value).reason == "TOKEN_REQUEST_REJECTED"


@pytest.fixture
def notion() -> Iterator[Notion]:
    server = Notion().start()
    yield server
    server.stop()


async def test_notion_json_body_and_basic_auth(make_broker: BrokerFactory, notion: Notion) -> None:
    broker = await _broker(make_broker, notion)
    await _connect(broker, notion)
    assert notion.authorization_requests()[-1].query["owner"] == "user"
    exchange = notion.token_requests()[-1]
    assert exchange.headers["content-type"].startswith("application/json")
    body = exchange.json()
    assert body["grant_type"] == "authorization_code" and body["redirect_uri"] == REDIRECT_URI
    assert "client_secret" not in body and exchange.basic() == (CLIENT_ID, notion.client_secret)
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
    refresh = notion.token_requests()[-1].json()
    assert refresh["grant_type"] == "refresh_token" and "scope" not in refresh


@pytest.fixture
def figma() -> Iterator[Figma]:
    server = Figma().start()
    yield server
    server.stop()


async def test_figma_refreshes_at_its_own_url_and_keeps_the_refresh_token(
    make_broker: BrokerFactory, figma: Figma
) -> None:
    broker = await _broker(make_broker, figma)
    await _connect(broker, figma)
    for _ in range(2):  # the answer has no refresh token: the old one is kept and works again
        await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
    assert [r.path for r in figma.token_requests()] == [
        Figma.token_path,
        Figma.refresh_path,
        Figma.refresh_path,
    ]
    assert len({r.form()["refresh_token"] for r in figma.token_requests(Figma.refresh_path)}) == 1


@pytest.fixture
def salesforce() -> Iterator[Salesforce]:
    server = Salesforce().start()
    yield server
    server.stop()


async def test_salesforce_without_expires_in_uses_default_expires_in(
    make_broker: BrokerFactory, salesforce: Salesforce
) -> None:
    broker = await _broker(make_broker, salesforce)
    connected_at = broker.clock.now()
    await _connect(broker, salesforce)
    resolved = await _resolve(broker)
    assert resolved.HasField("expires_at")
    assert abs(resolved.expires_at.seconds - (connected_at + 3600)) <= 1  # the preset's default
    assert salesforce.authorization_requests()[-1].query["scope"] == "api refresh_token"
    broker.clock.advance(3600)
    renewed = await _resolve(broker)  # refreshed because it was due, although Salesforce gave no lifetime
    assert renewed.access_token != resolved.access_token
    assert abs(renewed.expires_at.seconds - (broker.clock.now() + 3600)) <= 1


@pytest.fixture
def google() -> Iterator[Google]:
    server = Google().start()
    yield server
    server.stop()


async def test_google_offline_access_and_consent(make_broker: BrokerFactory, google: Google) -> None:
    broker = await _broker(make_broker, google)
    await _connect(broker, google)
    asked = google.authorization_requests()[-1].query
    assert (asked["access_type"], asked["prompt"]) == ("offline", "consent")
    assert asked["code_challenge_method"] == "S256"
    assert asked["scope"] == "openid email"
    assert len(google.grants) == 1  # a refresh token was issued (only with offline + consent)
    await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
    assert google.token_requests()[-1].form()["grant_type"] == "refresh_token"


async def test_http_200_error_is_a_rejection_even_without_a_preset(
    make_broker: BrokerFactory, github: GitHub
) -> None:
    """The rule holds for every upstream: an answer carrying ``error`` is a refusal, not an
    invalid answer (UNAVAILABLE, retried with backoff forever)."""
    auth = {
        "mode": "oauth_connect",
        "client_id": CLIENT_ID,
        "client_secret": github.client_secret,
        "token_endpoint_auth_method": "client_secret_post",
        "redirect_uri": REDIRECT_URI,
        **github.endpoints(),
    }
    broker = await make_broker(
        upstreams=[{"name": "up", "url": "https://api.github.com", "auth_broker": auth}]
    )
    started = await broker.stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream="up")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.Complete(
            pb.CompleteRequest(state=started.state, code="code-never-issued", user_id="alice")
        )
    assert error_info(info.value).reason == "TOKEN_REQUEST_REJECTED"
    assert "oauth_error" not in error_info(info.value).metadata  # not declared by this upstream: dropped


@pytest.mark.parametrize("kind", [Atlassian, Microsoft])
async def test_rotating_refresh_tokens_are_stored_and_used_once(
    make_broker: BrokerFactory, kind: type[Emulator]
) -> None:
    emulator = kind().start()
    try:
        broker = await _broker(make_broker, emulator)
        await _connect(broker, emulator)
        asked = emulator.authorization_requests()[-1].query
        assert "offline_access" in asked["scope"].split()
        if kind is Atlassian:
            assert (asked["audience"], asked["prompt"]) == ("api.atlassian.com", "consent")
        for _ in range(3):
            await broker.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream="up"))
        presented = [
            _fields(r)["refresh_token"] for r in emulator.token_requests() if "refresh_token" in _fields(r)
        ]
        assert len(presented) == 3 and len(set(presented)) == 3  # each rotated token used once
        if kind is Atlassian:
            body = emulator.token_requests()[-1].json()
            assert body["client_id"] == CLIENT_ID and body["client_secret"] == emulator.client_secret
        assert (await _resolve(broker)).access_token in emulator.minted
    finally:
        emulator.stop()
