"""A broker running as a real subprocess (``python -m broker serve``), for CLI and client tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.authserver import AuthServer, Client

REQUEST_HEADER = ("x-credential-broker-request", "true")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveBroker:
    """A broker process on a TCP port and a unix socket, configured for one upstream."""

    process: subprocess.Popen[bytes]
    target: str
    socket_target: str
    upstream: str
    auth: AuthServer
    client: Client
    config_path: Path
    log_path: Path

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stub(self) -> pb_grpc.CredentialBrokerStub:
        return pb_grpc.CredentialBrokerStub(self.channel())

    def connect(self, user: str) -> pb.CompleteResponse:
        """A real connect flow: BuildAuthorizationURL -> authorization server -> Complete."""
        stub = self.stub()
        md = (REQUEST_HEADER,)
        started = stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id=user, upstream=self.upstream), metadata=md
        )
        callback = self.auth.authorize(started.authorization_url, user)
        return stub.Complete(
            pb.CompleteRequest(state=started.state, code=callback["code"], user_id=user), metadata=md
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def write_config(tmp: Path, auth: AuthServer, client: Client, port: int, **extra: Any) -> Path:
    from tests.conftest import UPSTREAM, UPSTREAM_URL, upstream_doc  # noqa: F401 - shared shape

    doc: dict[str, Any] = {
        "listen": [f"127.0.0.1:{port}", f"unix://{tmp}/broker.sock"],
        "store": {"path": str(tmp / "data" / "broker.db")},
        "keyring": {"file": str(tmp / "keyring.json")},
        "log": {"format": "json"},
        "upstreams": [upstream_doc(auth, client)],
        **extra,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start_live_broker(tmp: Path, auth: AuthServer, **extra: Any) -> LiveBroker:
    from tests.conftest import REDIRECT_URI, UPSTREAM

    client = auth.new_client(redirect_uri=REDIRECT_URI)
    port = free_port()
    config = write_config(tmp, auth, client, port, **extra)
    if not (tmp / "keyring.json").exists():
        subprocess.run(
            [sys.executable, "-m", "broker", "keys", "generate", "--output", str(tmp / "keyring.json")],
            check=True,
            capture_output=True,
        )
    log_path = tmp / "broker.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    live = LiveBroker(
        process, f"127.0.0.1:{port}", f"unix://{tmp}/broker.sock", UPSTREAM, auth, client, config, log_path
    )
    wait_serving(live)
    return live


def wait_serving(live: LiveBroker, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with live.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if live.process.poll() is not None:
                raise RuntimeError(f"broker exited early:\n{live.logs()}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise RuntimeError(f"broker did not become healthy:\n{live.logs()}")
