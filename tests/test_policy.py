"""The Resolve policy: allow-all default, config rules (ids and verified claims), entry points."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.errors import ConfigError
from tests.authserver import AuthServer
from tests.conftest import UPSTREAM, Broker, BrokerFactory, error_info, upstream_doc
from tests.idp import IdentityProvider
from tests.test_identity import identity_doc
from tests.test_token_exchange import EXCHANGE, exchange_doc, subject


async def _denied(broker: Broker, user: str, upstream: str = UPSTREAM, **kw: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.resolve(user, upstream, **kw)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(info.value).reason == "POLICY_DENIED"
    return info.value.details()


async def _broker(make_broker: BrokerFactory, auth_server: AuthServer, **settings: Any) -> Broker:
    client = auth_server.new_client()
    return await make_broker(
        client=client, upstreams=[upstream_doc(auth_server, client), exchange_doc(auth_server)], **settings
    )


async def test_allow_all_by_default(broker: Broker) -> None:
    await broker.connect("alice")
    assert (await broker.resolve("alice")).access_token


async def test_rule_list_by_user_id(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    policy = {
        "rules": [
            {"effect": "deny", "users": ["bob"], "reason": "bob is suspended"},
            {"upstreams": [UPSTREAM], "users": ["alice", "bob"]},
            {"upstreams": [EXCHANGE], "users": ["*"]},
        ]
    }
    broker = await _broker(make_broker, auth_server, policy=policy)
    await broker.connect("alice")
    assert (await broker.resolve("alice")).access_token
    assert await _denied(broker, "bob") == "bob is suspended"
    carol = await _denied(broker, "carol")
    assert "no policy rule allows" in carol
    # The denial comes before any exchange: nothing is sent to the token endpoint.
    before = len(auth_server.token_requests())
    assert (
        await _denied(broker, "bob", EXCHANGE, subject_token=subject(auth_server, "bob"))
        == "bob is suspended"
    )
    assert len(auth_server.token_requests()) == before
    assert (await broker.resolve("carol", EXCHANGE, subject_token=subject(auth_server, "carol"))).access_token


async def test_default_allow(make_broker: BrokerFactory, auth_server: AuthServer) -> None:
    policy = {"rules": [{"effect": "deny", "upstreams": [EXCHANGE]}], "default": "allow"}
    broker = await _broker(make_broker, auth_server, policy=policy)
    await broker.connect("alice")
    assert (await broker.resolve("alice")).access_token
    assert "policy rule 0 denies" in await _denied(broker, "alice", EXCHANGE, subject_token="x")


async def test_rule_by_verified_claim(
    make_broker: BrokerFactory, auth_server: AuthServer, idp: IdentityProvider
) -> None:
    policy = {"rules": [{"claims": {"groups": "eng", "tenant": ["t1", "t2"]}, "reason": "engineers only"}]}
    broker = await _broker(make_broker, auth_server, policy=policy, identity=identity_doc(idp))
    eng = idp.sign(idp.claims("alice", groups=["eng", "ops"], tenant="t2"), "rsa-1")
    auth_server.exchange_users[eng] = "alice"
    assert (await broker.resolve("alice", EXCHANGE, subject_token=eng)).access_token
    sales = idp.sign(idp.claims("bob", groups=["sales"], tenant="t1"), "ec-1")
    assert "no policy rule allows" in await _denied(broker, "bob", EXCHANGE, subject_token=sales)
    other_tenant = idp.sign(idp.claims("carol", groups=["eng"], tenant="t9"), "ec-1")
    await _denied(broker, "carol", EXCHANGE, subject_token=other_tenant)


async def test_claim_rules_never_match_without_identity(
    make_broker: BrokerFactory, auth_server: AuthServer
) -> None:
    broker = await _broker(make_broker, auth_server, policy={"rules": [{"claims": {"groups": "eng"}}]})
    await _denied(broker, "alice", EXCHANGE, subject_token=subject(auth_server, "alice"))


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[None]:
    """Register tests.policy_plugin's functions as entry points of an installed distribution."""
    site = tmp_path / "site"
    dist = site / "broker_policy_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broker-policy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[credential_broker.policy]\n"
        "only-alice = tests.policy_plugin:only_alice\n"
        "engineers = tests.policy_plugin:async_engineers\n"
        "broken = tests.policy_plugin:broken\n"
        "confused = tests.policy_plugin:confused\n"
        "missing-module = tests.no_such_module:decide\n"
    )
    sys.path.insert(0, str(site))
    try:
        yield
    finally:
        sys.path.remove(str(site))


async def test_entry_point_decision_function(
    make_broker: BrokerFactory, auth_server: AuthServer, plugins: None
) -> None:
    broker = await _broker(make_broker, auth_server, policy={"entry_point": "only-alice"})
    await broker.connect("alice")
    assert (await broker.resolve("alice")).access_token
    assert await _denied(broker, "bob") == "plug-in: only alice may resolve"


async def test_async_entry_point_with_claims(
    make_broker: BrokerFactory, auth_server: AuthServer, idp: IdentityProvider, plugins: None
) -> None:
    broker = await _broker(
        make_broker, auth_server, policy={"entry_point": "engineers"}, identity=identity_doc(idp)
    )
    eng = idp.sign(idp.claims("alice", groups=["eng"]), "rsa-1")
    auth_server.exchange_users[eng] = "alice"
    assert (await broker.resolve("alice", EXCHANGE, subject_token=eng)).access_token
    await _denied(broker, "bob", EXCHANGE, subject_token=idp.sign(idp.claims("bob"), "rsa-1"))


@pytest.mark.parametrize("name", ["broken", "confused"])
async def test_failing_policy_fails_closed(
    make_broker: BrokerFactory,
    auth_server: AuthServer,
    plugins: None,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = await _broker(make_broker, auth_server, policy={"entry_point": name})
    await broker.connect("alice")
    details = await _denied(broker, "alice")
    assert details == "the policy could not be evaluated; denied"
    assert "backend down" not in caplog.text
    # The server keeps serving.
    assert (await broker.start_flow("alice")).state


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"entry_point": "nobody-registered-this"}, "no credential_broker.policy entry point named"),
        ({"entry_point": "missing-module"}, "could not be loaded (ModuleNotFoundError)"),
        ({"entry_point": "only-alice", "rules": [{}]}, "set either rules or entry_point"),
        ({"rules": [{"effect": "maybe"}]}, "policy.rules[0].effect"),
    ],
)
async def test_policy_config_errors(
    make_broker: BrokerFactory, auth_server: AuthServer, plugins: None, policy: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        await _broker(make_broker, auth_server, policy=policy)
    assert message in str(info.value)
