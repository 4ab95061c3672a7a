"""``serve`` with 2 worker processes on one TCP port (SO_REUSEPORT), on SQLite and PostgreSQL.

Observed from outside: both worker PIDs hold accepted connections on the shared port (read from
/proc), flows started through one worker complete through the other, and 40 concurrent Resolves
of one stale credential spread over both workers cause exactly one refresh-token request.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.authserver import AuthServer
from tests.live import REQUEST_HEADER, LiveBroker, start_live_broker

MD = (REQUEST_HEADER,)


@pytest.fixture(params=["sqlite", "postgres"])
def store_doc(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "postgres":
        return {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn"), "pool_size": 4}
    return {"path": str(tmp_path / "data" / "broker.db")}


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def _established_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local_port = int(parts[1].rpartition(":")[2], 16)
            if local_port == port and parts[3] == "01":  # ESTABLISHED, server side
                inodes.add(parts[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            out.add(match.group(1))
    return out


def _channel(live: LiveBroker) -> grpc.Channel:
    # A private subchannel pool: every channel opens its own TCP connection.
    return grpc.insecure_channel(live.target, options=[("grpc.use_local_subchannel_pool", 1)])


def _start(tmp_path: Path, auth: AuthServer, store: dict[str, Any]) -> LiveBroker:
    return start_live_broker(tmp_path, auth, workers=2, store=store)


def test_two_workers_share_the_port_and_the_store(
    tmp_path: Path, auth_server: AuthServer, store_doc: dict[str, Any]
) -> None:
    live = _start(tmp_path, auth_server, store_doc)
    channels: list[grpc.Channel] = []
    try:
        workers = _children(live.process.pid)
        assert len(workers) == 2
        # Flows started on one connection complete on another, wherever the kernel put them.
        for i in range(8):
            user = f"user-{i}"
            start_stub = pb_grpc.CredentialBrokerStub(_channel(live))
            started = start_stub.BuildAuthorizationURL(
                pb.BuildAuthorizationURLRequest(user_id=user, upstream=live.upstream), metadata=MD
            )
            callback = auth_server.authorize(started.authorization_url, user)
            with _channel(live) as other:
                pb_grpc.CredentialBrokerStub(other).Complete(
                    pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user), metadata=MD
                )
        for _ in range(16):
            channel = _channel(live)
            channels.append(channel)
            for i in range(8):
                answer = pb_grpc.CredentialBrokerStub(channel).Resolve(
                    pb.ResolveRequest(user_id=f"user-{i}", upstream=live.upstream), metadata=MD
                )
                info = auth_server.access_token_info(answer.access_token)
                assert info is not None and info["user"] == f"user-{i}"
        port = int(live.target.rpartition(":")[2])
        established = _established_inodes(port)
        serving = [pid for pid in workers if _socket_inodes(pid) & established]
        assert sorted(serving) == sorted(workers), "both workers accepted connections"
        pids = {json.loads(line).get("pid") for line in live.logs().splitlines() if '"serving"' in line}
        assert pids == set(workers)
    finally:
        for channel in channels:
            channel.close()
        assert live.stop(signal.SIGTERM) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_one_refresh_for_a_stale_credential_across_workers(
    tmp_path: Path, auth_server: AuthServer, store_doc: dict[str, Any]
) -> None:
    auth_server.access_ttl = 30  # inside the 60 s refresh window: stale at once
    live = _start(tmp_path, auth_server, store_doc)
    try:
        live.connect("alice")
        auth_server.access_ttl = 3600  # the refreshed token is fresh
        before = len(auth_server.token_requests("refresh_token"))
        channels = [_channel(live) for _ in range(20)]

        def resolve(i: int) -> str:
            stub = pb_grpc.CredentialBrokerStub(channels[i % len(channels)])
            answer = stub.Resolve(pb.ResolveRequest(user_id="alice", upstream=live.upstream), metadata=MD)
            return str(answer.access_token)

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            tokens = set(pool.map(resolve, range(40)))
        for channel in channels:
            channel.close()
        assert len(auth_server.token_requests("refresh_token")) - before == 1
        assert len(tokens) == 1
    finally:
        assert live.stop(signal.SIGTERM) == 0


def test_workers_need_a_tcp_address(tmp_path: Path, auth_server: AuthServer) -> None:
    from broker.cli import main
    from tests.live import write_config

    config = write_config(tmp_path, auth_server, auth_server.new_client(), 0, workers=2)
    text = config.read_text().replace("- 127.0.0.1:0\n", "")
    config.write_text(text)
    assert main(["serve", "--config", str(config)]) == 2


def test_each_worker_gets_its_own_audit_file(tmp_path: Path) -> None:
    """Rotation renames files, so two processes must never rotate the same one."""
    from broker.config import load_config
    from broker.workers import worker_configs

    config = load_config(
        {
            "keyring": {"file": "k.json"},
            "workers": 3,
            "listen": ["127.0.0.1:0"],
            "audit": {"output": "file", "path": "audit/audit.jsonl"},
        },
        environ={},
        base_dir=tmp_path,
    )
    paths = [c.audit.path for c in worker_configs(config, list(config.listeners()))]
    base = tmp_path / "audit" / "audit.jsonl"
    assert paths == [base, base.with_name("audit.jsonl.w1"), base.with_name("audit.jsonl.w2")]


def test_workers_share_one_refresh_process(tmp_path: Path, auth_server: AuthServer) -> None:
    live = start_live_broker(
        tmp_path, auth_server, workers=2, background_refresh={"enabled": True, "interval_seconds": 0.2}
    )
    try:
        workers = _children(live.process.pid)
        assert len(workers) == 2
        deadline = time.monotonic() + 15
        while True:
            refreshers = [
                child
                for worker in workers
                for child in _children(worker)
                if b"broker.refresh_worker" in Path(f"/proc/{child}/cmdline").read_bytes()
            ]
            if refreshers or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(refreshers) == 1  # worker 0's; the other worker starts none
        time.sleep(1.0)  # several ticks later, still one
        assert sum(len(_children(worker)) for worker in workers) == 1
    finally:
        assert live.stop(signal.SIGTERM) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in [*workers, *refreshers])
