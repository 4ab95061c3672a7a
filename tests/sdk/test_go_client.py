"""The Go SDK (clients/go): go vet, and its own tests (client_test.go) pass
against real ``broker serve`` processes on one store and the loopback authorization server.
Each Go test is run by its own pytest test, so a failure names it. That its generated stubs
are current is tests/ecosystem/test_clients.py::test_go_generated_code_is_current."""

from __future__ import annotations

import functools
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from credential_broker_client import BrokerClient

from broker.crypto import generate_keyring_file
from tests import leakcheck
from tests.authserver import AuthServer
from tests.brokerproc import write_config
from tests.conftest import REDIRECT_URI, UPSTREAM, upstream_doc
from tests.ecosystem.conftest import check, client_env, require_tool, run
from tests.idp import IdentityProvider
from tests.live import free_port

from .conftest import PatientServerProcess, connect

GO_SDK = Path(__file__).resolve().parents[2] / "clients" / "go"
GO_TESTS = [
    "TestEveryRPC",
    "TestDisconnectAll",
    "TestConnectRequiredErrorsCarryTheAuthorizationURL",
    "TestInsufficientScope",
    "TestOtherErrorsAreTyped",
    "TestOnlyUnavailableIsRetried",
    "TestUnavailableIsRetriedWhileTheBrokerRestarts",
    "TestCacheHitsAndInvalidationFromAnotherReplica",
    "TestCacheDroppedWhenTheStreamBreaksAndResumed",
    "TestCacheResyncsWhenTheBrokerNoLongerKeepsItsResumePoint",
    "TestRoundTripperRetriesOne401WithARefreshedToken",
    "TestRoundTripperReturnsASecond401",
    "TestAWatchRefusedRightAfterItsHeadersBacksOff",
    "TestAWatchRefusedBeforeItsHeadersIsNotLive",
    "TestUnavailableWithAnotherReasonIsTyped",
    "TestRoundTripperKeepsTheCredentialToTheFirstOrigin",
    "TestRoundTripperClosesTheBodyWhenResolveFails",
    "TestRoundTripperDoesNotResendABodyItCannotReplay",
    "TestPrintingShowsNoSecret",
    "TestUserTokenGoesWithEveryUserScopedCall",
    "TestAnotherUsersTokenIsUserMismatch",
    "TestTransportSendsItsUserToken",
    "TestUserTokenTravelsWithTheOtherMetadata",
    "TestCacheIsABoundedLRU",
    "TestCacheServesOnlyTheScopesItHolds",
    "TestCacheServesOnlyWhatStaysValidLongEnough",
    "TestRoundTripperDoesNotReadARefusedBodyToItsEnd",
    "TestCallsKeepTheCallersOwnMetadata",
    "TestRoundTripperTakesARequestWithoutAHeaderMap",
    "TestCallsEndedByTheirContextSaySo",
    "TestUnavailableIsRetriedUntilTheDeadline",
]

pytestmark = pytest.mark.timeout(300)

#: The lifetime of the access tokens broker G's authorization server issues: under the cache's
#: 30 s floor, so a cached client must never answer from memory with one of them.
SHORT_TTL = 20


@dataclass
class GoEnv:
    env: dict[str, str]
    auth: AuthServer
    log_dir: Path
    #: Issues access tokens valid for SHORT_TTL seconds (broker G's authorization server).
    short_auth: AuthServer
    #: The user tokens minted for broker F (never committed, never printed).
    user_tokens: tuple[str, ...]


@pytest.fixture(scope="module")
def go_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoEnv]:
    """Brokers A and B (processes, one SQLite store), a config for C (started by the Go tests
    themselves), and a user whose grant the authorization server revoked. Also, on a second
    store that keeps one connection event (reaped every 0.2 s): broker E, and a config for D
    (started by the resync test). And broker F (same store) with an ``identity:`` config
    verifying user tokens signed by a loopback identity provider, with a token minted at run
    time for each of two users. And a config for G (started by the Go cache test), on a store of its
    own, whose authorization server issues access tokens valid for SHORT_TTL seconds and which
    does not refresh them before they expire (refresh_window_seconds 0)."""
    tmp = tmp_path_factory.mktemp("go-sdk")
    auth = AuthServer().start()
    short_auth = AuthServer(access_ttl=SHORT_TTL).start()
    idp = IdentityProvider().start()
    idp.add_key("rsa", "rsa-1")
    idp.add_key("ec", "ec-1")
    client = auth.new_client(redirect_uri=REDIRECT_URI)
    generate_keyring_file(tmp / "keyring.json")
    document = {
        "store": {"path": str(tmp / "data" / "broker.db")},
        "keyring": {"file": str(tmp / "keyring.json")},
        "upstreams": [upstream_doc(auth, client)],
        "background_refresh": {"enabled": False},
        # The 401 test reports a token minutes after connecting, not the default 30 s.
        "min_refresh_interval_seconds": 0,
    }
    port_c = free_port()
    config_c = write_config(document, tmp / "c.yaml", listen=[f"127.0.0.1:{port_c}"])
    servers = [
        PatientServerProcess(write_config(document, tmp / f"{n}.yaml"), tmp / f"{n}.log") for n in "ab"
    ]
    trimmed = {
        **document,
        "store": {"path": str(tmp / "trimmed" / "broker.db")},
        "events": {"max_events": 1},
        "retention": {"interval_seconds": 0.2},
    }
    port_d = free_port()
    config_d = write_config(trimmed, tmp / "d.yaml", listen=[f"127.0.0.1:{port_d}"])
    servers.append(PatientServerProcess(write_config(trimmed, tmp / "e.yaml"), tmp / "e.log"))
    identity = {
        **document,
        "identity": {"issuer": idp.issuer, "audiences": ["broker"], "algorithms": ["RS256", "ES256"]},
    }
    servers.append(PatientServerProcess(write_config(identity, tmp / "f.yaml"), tmp / "f.log"))
    short_lived = {
        **document,
        "store": {"path": str(tmp / "short" / "broker.db")},
        "upstreams": [upstream_doc(short_auth, short_auth.new_client(redirect_uri=REDIRECT_URI))],
        "refresh_window_seconds": 0,
    }
    port_g = free_port()
    config_g = write_config(short_lived, tmp / "g.yaml", listen=[f"127.0.0.1:{port_g}"])
    users = ("go-identity-alice", "go-identity-bob")
    # Valid for the whole module (the IdP's default is 10 minutes).
    expires = int(time.time()) + 3600
    tokens = (
        idp.sign(idp.claims(users[0], exp=expires), "rsa-1"),
        idp.sign(idp.claims(users[1], exp=expires), "ec-1"),
    )
    try:
        with BrokerClient(servers[0].address) as sdk:
            connect(sdk, auth, "go-revoked")
        auth.revoke_user("go-revoked")
        env = client_env(
            CB_TEST_TARGET_A=servers[0].address,
            CB_TEST_TARGET_B=servers[1].address,
            CB_TEST_TARGET_C=f"127.0.0.1:{port_c}",
            CB_TEST_CONFIG_C=str(config_c),
            CB_TEST_TARGET_D=f"127.0.0.1:{port_d}",
            CB_TEST_CONFIG_D=str(config_d),
            CB_TEST_TARGET_E=servers[2].address,
            CB_TEST_PYTHON=sys.executable,
            CB_TEST_LOG_DIR=str(tmp),
            CB_TEST_UPSTREAM=UPSTREAM,
            CB_TEST_REVOKED_USER="go-revoked",
            CB_TEST_TARGET_IDENTITY=servers[3].address,
            CB_TEST_IDENTITY_USER=users[0],
            CB_TEST_IDENTITY_TOKEN=tokens[0],
            CB_TEST_IDENTITY_OTHER_USER=users[1],
            CB_TEST_IDENTITY_OTHER_TOKEN=tokens[1],
            CB_TEST_TARGET_G=f"127.0.0.1:{port_g}",
            CB_TEST_CONFIG_G=str(config_g),
            CB_TEST_SHORT_TTL=str(SHORT_TTL),
            GOFLAGS="-mod=mod",
        )
        yield GoEnv(env, auth, tmp, short_auth, tokens)
    finally:
        for server in servers:
            server.stop()
        for log in tmp.glob("*.log"):
            leakcheck.observe_text(log.read_text(errors="replace"), "broker log")
        auth.stop()
        short_auth.stop()
        idp.stop()


def test_go_vet() -> None:
    go = require_tool("go")
    check(run([go, "vet", "./..."], cwd=GO_SDK, env=client_env(GOFLAGS="-mod=mod"), timeout=600), "go vet")


def test_every_go_test_is_run_here() -> None:
    """A Go test left out of GO_TESTS would never run in CI."""
    written = {
        match.group(1)
        for source in GO_SDK.glob("*_test.go")
        for match in re.finditer(r"^func (Test\w+)\(t \*testing\.T\)", source.read_text(), re.M)
    }
    assert written and written == set(GO_TESTS)


@functools.cache
def race_flags(go: str) -> tuple[str, ...]:
    """``-race`` where the race detector can be built (cgo and a C compiler): the SDK is used
    from many goroutines at once, and its tests exercise that."""
    cgo = run([go, "env", "CGO_ENABLED", "CC"], env=client_env(), timeout=60).stdout.split()
    return ("-race",) if len(cgo) == 2 and cgo[0] == "1" and shutil.which(cgo[1]) else ()


@pytest.mark.parametrize("name", GO_TESTS)
def test_go_sdk(go_env: GoEnv, name: str) -> None:
    go = require_tool("go")
    leakcheck.add_secret(*go_env.user_tokens)
    done = run(
        [go, "test", *race_flags(go), "-count=1", "-v", "-timeout", "240s", "-run", f"^{name}$", "."],
        cwd=GO_SDK,
        env=go_env.env,
        timeout=280,
    )
    leakcheck.observe_text(done.stdout + done.stderr, "go test output")
    for secret in [*go_env.auth.issued, *go_env.short_auth.issued, *go_env.user_tokens]:
        assert secret not in done.stdout + done.stderr, "a secret in the Go SDK's output"
    check(done, f"go test -run {name}")
    assert f"--- PASS: {name}" in done.stdout, done.stdout
