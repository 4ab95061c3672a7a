"""Wrapped keyrings (keyring.wrapped_by): every KEK in the file wrapped by a root key held by a real
SoftHSM2 token (pkcs11) or a real local-kms (aws_kms) on loopback; no mocks.

Each test runs for both sources: generate, wrap, serve, resolve, restart, resolve; rotation of the
KEKs under a steady Resolve load with zero failed calls; rewrap-root after rotating the root key
in the KMS; the wrong root key refused; the KMS stopped after start (still serving) and before
start (a clear error after keyring.unwrap_timeout_seconds); no KEK in logs, errors or files.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from opentelemetry.proto.trace.v1 import trace_pb2

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests import leakcheck
from tests.authserver import AuthServer
from tests.brokerproc import ServerProcess, run_cli
from tests.conftest import REDIRECT_URI, UPSTREAM, SyncRequestHeader, upstream_doc
from tests.rootkeys import LocalKms, RootServer, SoftHsmRoot, unwrapped_materials
from tests.test_tracing import Receiver, _observe, attributes
from tests.test_tracing import receiver as receiver  # a fixture

# Each test starts several broker and CLI processes: slow on a loaded machine, bounded all the same.
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(params=["pkcs11", "aws_kms"])
def root(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RootServer]:
    server: RootServer
    if request.param == "pkcs11":
        server = SoftHsmRoot(tmp_path, monkeypatch)
    else:
        server = LocalKms(tmp_path, monkeypatch)
    try:
        yield server
    finally:
        if isinstance(server, LocalKms):
            server.stop()


class Server(ServerProcess):
    """A broker process, given longer to start: unwrapping at start-up calls the KMS or HSM."""

    def _wait_serving(self, timeout: float = 60.0) -> str:
        return super()._wait_serving(timeout)


class Setup:
    """A plain keyring, a store, an authorization server client and the config files around them."""

    def __init__(self, tmp: Path, auth: AuthServer, root: RootServer) -> None:
        self.tmp = tmp
        self.root = root
        self.keyring = tmp / "keyring.json"
        run_cli("keys", "generate", "--output", str(self.keyring))
        self.keks: set[bytes] = set()
        self._remember(_plain_materials(self.keyring))
        client = auth.new_client(auth_method="client_secret_basic", redirect_uri=REDIRECT_URI)
        self.base: dict[str, Any] = {
            "listen": ["127.0.0.1:0"],
            "store": {"path": str(tmp / "data" / "broker.db")},
            "upstreams": [upstream_doc(auth, client)],
            "background_refresh": {"enabled": False},
        }
        self.auth = auth
        self.plain = self.config("plain.yaml", None)
        self.wrapped = self.config("wrapped.yaml", root.wrapped_by())
        self.servers: list[ServerProcess] = []

    def config(self, name: str, wrapped_by: dict[str, Any] | None, **keyring: Any) -> Path:
        section: dict[str, Any] = {"file": str(self.keyring), **keyring}
        if wrapped_by is not None:
            section["wrapped_by"] = wrapped_by
        path = self.tmp / name
        path.write_text(yaml.safe_dump({**self.base, "keyring": section}))
        return path

    def serve(self, config: Path) -> ServerProcess:
        server = Server(config, self.tmp / f"server{len(self.servers)}.log")
        self.servers.append(server)
        return server

    def learn_wrapped_keys(self, config: Path | None = None) -> None:
        """Every KEK of the wrapped keyring, for the leak check (never printed)."""
        self._remember(unwrapped_materials(config or self.wrapped))

    def _remember(self, materials: list[bytes]) -> None:
        for material in materials:
            self.keks.add(material)
            leakcheck.add_secret(
                base64.urlsafe_b64encode(material).decode().rstrip("="),
                base64.b64encode(material).decode(),
                material.hex(),
                material,
            )

    def assert_no_kek_in_files(self) -> None:
        """No KEK, raw or encoded, in any file of the test: keyring, logs, store, configs."""
        forms = set()
        for kek in self.keks:
            forms |= {
                kek,
                kek.hex().encode(),
                base64.b64encode(kek),
                base64.urlsafe_b64encode(kek).rstrip(b"="),
            }
        for path in self.tmp.rglob("*"):
            if path.is_file():  # the SoftHSM2 token and local-kms data folders included
                data = path.read_bytes()
                assert not [f for f in forms if f in data], f"a KEK in {path.name}"

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def setup(tmp_path: Path, auth_server: AuthServer, root: RootServer) -> Iterator[Setup]:
    made = Setup(tmp_path, auth_server, root)
    try:
        yield made
    finally:
        made.stop_all()


def _plain_materials(path: Path) -> list[bytes]:
    document = json.loads(path.read_text())
    return [
        base64.urlsafe_b64decode(k["material"] + "=" * (-len(k["material"]) % 4)) for k in document["keys"]
    ]


class Client:
    """A synchronous client of one broker process."""

    def __init__(self, server: ServerProcess, auth: AuthServer) -> None:
        self.channel = grpc.intercept_channel(grpc.insecure_channel(server.address), SyncRequestHeader())
        self.stub = pb_grpc.CredentialBrokerStub(self.channel)
        self.auth = auth

    def connect(self, user: str) -> None:
        started = self.stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id=user, upstream=UPSTREAM)
        )
        callback = self.auth.authorize(started.authorization_url, user)
        self.stub.Complete(pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user))

    def resolve(self, user: str) -> str:
        token = self.stub.Resolve(pb.ResolveRequest(user_id=user, upstream=UPSTREAM), timeout=10).access_token
        assert token
        return str(token)

    def close(self) -> None:
        self.channel.close()


def test_wrap_serve_resolve_restart_resolve_and_unwrap(setup: Setup) -> None:
    # Records written under the plain keyring stay as they are: only the keyring file changes.
    plain = setup.serve(setup.plain)
    client = Client(plain, setup.auth)
    client.connect("alice")
    client.close()
    plain.stop()

    done = run_cli("keys", "wrap", "--config", str(setup.wrapped))
    assert setup.root.kind in done.stdout
    document = json.loads(setup.keyring.read_text())
    assert document["format"] == "credential-broker-wrapped-keyring/v1"
    assert all("material" not in k and k["wrapped"] for k in document["keys"])
    assert (setup.keyring.stat().st_mode & 0o777) == 0o600
    setup.assert_no_kek_in_files()
    # The plain config on a wrapped file is refused with what to do.
    refused = run_cli("serve", "--config", str(setup.plain), check=False)
    assert refused.returncode == 2 and "wrapped_by" in refused.stderr

    for _ in range(2):  # serve, resolve; restart, resolve
        server = setup.serve(setup.wrapped)
        client = Client(server, setup.auth)
        assert client.resolve("alice")
        client.connect("bob")
        assert client.resolve("bob")
        client.close()
        server.stop()

    status = run_cli("keys", "status", "--config", str(setup.wrapped)).stdout
    assert "primary\t2" in status  # keys status unchanged on a wrapped keyring
    run_cli("keys", "unwrap", "--config", str(setup.wrapped))
    assert _plain_materials(setup.keyring)  # back to a plain keyring, the same keys
    assert set(_plain_materials(setup.keyring)) == setup.keks
    server = setup.serve(setup.plain)
    client = Client(server, setup.auth)
    assert client.resolve("alice") and client.resolve("bob")
    client.close()


def test_rotation_on_a_wrapped_keyring_under_steady_resolve_load(setup: Setup) -> None:
    run_cli("keys", "wrap", "--config", str(setup.wrapped))
    server = setup.serve(setup.wrapped)
    client = Client(server, setup.auth)
    users = [f"user{i}" for i in range(4)]
    for user in users:
        client.connect(user)
    (old,) = [
        line.split("\t")[0]
        for line in run_cli("keys", "status", "--config", str(setup.wrapped)).stdout.splitlines()
    ]
    stop = threading.Event()
    calls = {"resolve": 0, "refresh": 0}
    failures: list[str] = []

    def load(offset: int) -> None:
        i = offset
        while not stop.is_set():
            user = users[i % len(users)]
            try:
                if i % 7 == 0:  # writes too: a refresh seals under whatever the primary is now
                    client.stub.Refresh(pb.RefreshRequest(user_id=user, upstream=UPSTREAM), timeout=10)
                    calls["refresh"] += 1
                else:
                    client.resolve(user)
                    calls["resolve"] += 1
            except grpc.RpcError as exc:
                failures.append(exc.code().name)
            i += 1

    workers = [threading.Thread(target=load, args=(n,)) for n in range(3)]
    for worker in workers:
        worker.start()
    try:
        new = run_cli("keys", "add", "--config", str(setup.wrapped)).stdout.strip()
        run_cli("keys", "promote", new, "--config", str(setup.wrapped))
        time.sleep(0.3)
        run_cli("keys", "rewrap", "--config", str(setup.wrapped), "--batch-size", "2")
        run_cli("keys", "retire", old, "--config", str(setup.wrapped))
        time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert failures == []
    assert calls["resolve"] > 20 and calls["refresh"] > 2
    status = run_cli("keys", "status", "--config", str(setup.wrapped)).stdout
    assert status == f"{new}\tprimary\t{len(users)}\n"
    document = json.loads(setup.keyring.read_text())
    assert [k["id"] for k in document["keys"]] == [new] and "material" not in document["keys"][0]
    setup.learn_wrapped_keys()
    client.close()
    server.stop()
    # A fresh process unwraps the rotated keyring and opens every record.
    again = Client(setup.serve(setup.wrapped), setup.auth)
    assert all(again.resolve(user) for user in users)
    again.close()
    setup.stop_all()
    setup.assert_no_kek_in_files()


def test_rewrap_root_after_rotating_the_root_key(setup: Setup) -> None:
    run_cli("keys", "wrap", "--config", str(setup.wrapped))
    server = setup.serve(setup.wrapped)
    client = Client(server, setup.auth)
    client.connect("alice")
    run_cli("keys", "add", "--config", str(setup.wrapped))
    setup.learn_wrapped_keys()
    before = {k["id"]: k["wrapped"] for k in json.loads(setup.keyring.read_text())["keys"]}

    rotated = setup.config("rotated.yaml", setup.root.rotate())
    done = run_cli("keys", "rewrap-root", "--config", str(rotated))
    assert "re-wrapped 2 key(s)" in done.stdout
    after = {k["id"]: k["wrapped"] for k in json.loads(setup.keyring.read_text())["keys"]}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    assert client.resolve("alice")  # the running broker never noticed
    client.close()
    server.stop()

    setup.root.retire_old()  # the old root key is gone: only the new one can open the keyring
    server = setup.serve(rotated)
    client = Client(server, setup.auth)
    assert client.resolve("alice")
    assert run_cli("keys", "add", "--config", str(rotated)).stdout.strip()  # wraps under the new root
    client.close()
    setup.learn_wrapped_keys(rotated)
    setup.stop_all()
    setup.assert_no_kek_in_files()


def test_the_wrong_root_key_is_refused_with_the_key_ids(setup: Setup) -> None:
    run_cli("keys", "wrap", "--config", str(setup.wrapped))
    ids = [k["id"] for k in json.loads(setup.keyring.read_text())["keys"]]
    wrong = setup.config("wrong.yaml", setup.root.other_root(), unwrap_timeout_seconds=3)
    started = time.monotonic()
    for command in (["serve"], ["keys", "unwrap"]):
        done = run_cli(*command, "--config", str(wrong), check=False)
        assert done.returncode == 2, command
        lines = done.stderr.strip().splitlines()
        assert "does not unwrap" in lines[-1] and all(kid in lines[-1] for kid in ids), lines[-1]
        assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60  # refused at once, not retried until the timeout
    # A tampered file: one wrapped KEK with a flipped byte is refused the same way, by id.
    document = json.loads(setup.keyring.read_text())
    blob = bytearray(base64.urlsafe_b64decode(document["keys"][0]["wrapped"] + "=="))
    blob[-3] ^= 0x01
    document["keys"][0]["wrapped"] = base64.urlsafe_b64encode(bytes(blob)).decode().rstrip("=")
    setup.keyring.write_text(json.dumps(document))
    setup.keyring.chmod(0o600)
    done = run_cli("serve", "--config", str(setup.wrapped), check=False)
    assert done.returncode == 2 and "does not unwrap" in done.stderr and ids[0] in done.stderr
    setup.assert_no_kek_in_files()


def test_kms_stopped_after_start_keeps_serving(setup: Setup) -> None:
    run_cli("keys", "wrap", "--config", str(setup.wrapped))
    server = setup.serve(setup.wrapped)
    client = Client(server, setup.auth)
    client.connect("alice")
    setup.root.stop()
    try:
        for _ in range(20):
            assert client.resolve("alice")
        client.stub.Refresh(pb.RefreshRequest(user_id="alice", upstream=UPSTREAM), timeout=10)
        client.connect("bob")  # new records are sealed with the KEKs in memory
        assert client.resolve("bob")
        # Changing the keyring needs the root key: refused, and the running broker is untouched.
        done = run_cli(
            "keys",
            "add",
            "--config",
            str(setup.config("short.yaml", setup.root.wrapped_by(), unwrap_timeout_seconds=1)),
            check=False,
        )
        assert done.returncode == 2 and setup.root.kind in done.stderr
        assert client.resolve("alice")
    finally:
        setup.root.start()
    client.close()
    setup.stop_all()
    setup.assert_no_kek_in_files()


def test_kms_stopped_before_start_is_a_clear_error_after_the_timeout(setup: Setup) -> None:
    run_cli("keys", "wrap", "--config", str(setup.wrapped))
    short = setup.config("short.yaml", setup.root.wrapped_by(), unwrap_timeout_seconds=2)
    setup.root.stop()
    try:
        started = time.monotonic()
        done = run_cli("serve", "--config", str(short), check=False)
        took = time.monotonic() - started
    finally:
        setup.root.start()
    assert done.returncode == 2
    assert 2 <= took < 25, took  # waited for the timeout, then gave up (generous margin)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("credential-broker: ") and setup.root.kind in last
    assert "unwrap_timeout_seconds" in last and "Traceback" not in done.stderr
    # The source comes back: the same config serves.
    server = setup.serve(short)
    client = Client(server, setup.auth)
    client.connect("alice")
    assert client.resolve("alice")
    client.close()
    setup.stop_all()
    setup.assert_no_kek_in_files()


def test_the_root_key_calls_at_start_are_client_spans(setup: Setup, receiver: tuple[Receiver, str]) -> None:
    """With tracing on, each unwrap at start-up is a ``kms`` client span naming the source, and
    no span carries key material (the receiver's text goes through the leak check)."""
    collector, endpoint = receiver
    run_cli("keys", "wrap", "--config", str(setup.wrapped))
    setup.learn_wrapped_keys()
    setup.base["tracing"] = {"enabled": True, "endpoint": endpoint}
    traced = setup.config("traced.yaml", setup.root.wrapped_by())
    server = setup.serve(traced)
    client = Client(server, setup.auth)
    client.connect("alice")
    client.close()
    server.stop()  # flushes the exporter
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not [s for s in collector.spans if s.name == "kms"]:
        time.sleep(0.2)
    kms = [s for s in collector.spans if s.name == "kms"]
    _observe(collector.spans)
    assert kms, [s.name for s in collector.spans]
    for span in kms:
        found = attributes(span)
        assert span.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert found["credential_broker.call"] == "kms"
        assert found["credential_broker.key_source"] == setup.root.kind
        # local-kms on loopback; a PKCS#11 module has no host
        assert found["server.address"] == ("127.0.0.1" if setup.root.kind == "aws_kms" else "")
