"""Listeners through the real CLI: who may listen where (item 11) and unix sockets (item 12).

Every case runs ``python -m broker`` as a real process: ``config check`` and ``serve`` must
refuse a non-loopback TCP listener without TLS and caller authentication, and a second broker
must never take over a live unix socket of the first.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.callers import token_hash
from broker.crypto import generate_keyring_file
from tests.brokerproc import ServerProcess, run_cli
from tests.pki import TestCA


def _config(tmp: Path, name: str = "broker.yaml", **settings: Any) -> Path:
    keyring = tmp / "keyring.json"
    if not keyring.exists():
        generate_keyring_file(keyring)
    document = {
        "listen": ["127.0.0.1:0"],
        "store": {"path": str(tmp / "data" / "broker.db")},
        "keyring": {"file": str(keyring)},
        **settings,
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(document))
    return path


def _tls(tmp: Path, *, client_ca: bool) -> dict[str, str]:
    ca = TestCA()
    cert, key = ca.issue("broker", dns=["localhost"], ips=["127.0.0.1"], server=True).write(tmp, "server")
    tls = {"cert_file": str(cert), "key_file": str(key)}
    if client_ca:
        (tmp / "ca.crt").write_bytes(ca.pem)
        tls["client_ca_file"] = str(tmp / "ca.crt")
    return tls


def _refused(config: Path) -> tuple[str, str]:
    """Both ``config check`` and ``serve`` exit 2 with one line and no traceback; their lines."""
    lines = []
    for command in (["config", "check"], ["serve"]):
        done = run_cli(*command, "--config", str(config), check=False)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        lines.append(done.stderr.strip())
    return lines[0], lines[1]


def test_any_address_with_tls_but_no_caller_authentication_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, listen=["0.0.0.0:0"], tls=_tls(tmp_path, client_ca=False))
    for line in _refused(config):
        assert "listen[0]: '0.0.0.0:0' is not a loopback address" in line
        assert "tls.client_ca_file" in line and "callers" in line


def test_any_address_without_tls_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, listen=["127.0.0.1:0", {"address": "0.0.0.0:0"}])
    for line in _refused(config):
        assert "listen[1]: '0.0.0.0:0' is not a loopback address" in line
        assert "set tls" in line and "tls.client_ca_file" in line and "callers" in line


def test_listen_flag_cannot_bypass_the_rule(tmp_path: Path) -> None:
    config = _config(tmp_path)
    done = run_cli("serve", "--config", str(config), "--listen", "0.0.0.0:0", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not a loopback address" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_loopback_without_tls_is_fine(tmp_path: Path) -> None:
    config = _config(tmp_path, listen=["127.0.0.1:0", "localhost:0"])
    assert run_cli("config", "check", "--config", str(config)).returncode == 0
    server = ServerProcess(_config(tmp_path, "serve.yaml"), tmp_path / "serve.log")
    server.stop()
    assert server.proc.returncode == 0


def test_any_address_with_mutual_tls_or_callers_is_accepted(tmp_path: Path) -> None:
    mutual = _config(tmp_path, listen=["0.0.0.0:0"], tls=_tls(tmp_path, client_ca=True))
    assert run_cli("config", "check", "--config", str(mutual)).returncode == 0
    server = ServerProcess(mutual, tmp_path / "mutual.log")
    server.stop()
    assert server.proc.returncode == 0
    callers = [{"name": "app", "token_sha256": token_hash("generated-at-test-time")}]
    by_token = _config(
        tmp_path, "token.yaml", listen=["0.0.0.0:0"], tls=_tls(tmp_path, client_ca=False), callers=callers
    )
    assert run_cli("config", "check", "--config", str(by_token)).returncode == 0


# -- unix sockets (item 12) ----------------------------------------------------------------


def _healthy(path: Path) -> bool:
    with grpc.insecure_channel(f"unix://{path}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def test_a_live_socket_is_never_taken_over(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "broker.sock"
    first = ServerProcess(
        _config(tmp_path, "first.yaml", listen=["127.0.0.1:0", f"unix://{sock}"]), tmp_path / "first.log"
    )
    try:
        inode = sock.stat().st_ino
        second_config = _config(tmp_path, "second.yaml", listen=["127.0.0.1:0", f"unix://{sock}"])
        second = subprocess.run(
            [sys.executable, "-m", "broker", "serve", "--config", str(second_config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (
            f"credential-broker: listen[1]: another process is serving on {sock}"
        )
        assert sock.stat().st_ino == inode
        assert _healthy(sock)  # the first broker is still reachable on its socket
    finally:
        first.stop()
    assert first.proc.returncode == 0
    assert not sock.exists()


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "broker.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays; nothing listens on it
    server = ServerProcess(_config(tmp_path, listen=[f"unix://{sock}"]), tmp_path / "serve.log")
    try:
        assert _healthy(sock)
    finally:
        server.stop()
    assert server.proc.returncode == 0 and not sock.exists()


def test_shutdown_leaves_a_socket_it_did_not_create(tmp_path: Path) -> None:
    """Someone replaced the broker's socket file while it ran: the broker leaves the new one alone."""
    sock = tmp_path / "broker.sock"
    server = ServerProcess(
        _config(tmp_path, listen=["127.0.0.1:0", f"unix://{sock}"]), tmp_path / "serve.log"
    )
    try:
        sock.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(sock))
        other.listen()
        inode = sock.stat().st_ino
    finally:
        server.stop()
    try:
        assert server.proc.returncode == 0
        assert sock.exists() and sock.stat().st_ino == inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(5)
            probe.connect(str(sock))  # still the other listener
    finally:
        other.close()


@pytest.mark.parametrize("command", [["config", "check"], ["serve"]])
def test_config_check_and_serve_name_a_live_socket(tmp_path: Path, command: list[str]) -> None:
    sock = tmp_path / "busy.sock"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(str(sock))
    holder.listen()
    try:
        started = time.monotonic()
        done = run_cli(*command, "--config", str(_config(tmp_path, listen=[f"unix://{sock}"])), check=False)
        assert time.monotonic() - started < 25
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip() == f"credential-broker: listen[0]: another process is serving on {sock}"
        assert sock.exists()
    finally:
        holder.close()
