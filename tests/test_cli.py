"""The command line and the server process: serve, SIGTERM, keys generate, config check, start-up errors."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.cli import main
from tests.authserver import AuthServer
from tests.live import REQUEST_HEADER, LiveBroker, free_port, start_live_broker


def _run(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_keys_generate_writes_0600_and_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "keys" / "keyring.json"
    assert main(["keys", "generate", "--output", str(target)]) == 0
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    document = json.loads(target.read_text())
    (key,) = document["keys"]
    assert key["state"] == "primary" and key["material"] not in capsys.readouterr().out
    before = target.read_text()
    assert main(["keys", "generate", "--output", str(target)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert target.read_text() == before


def test_config_check_reports_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "keyring": {"file": "k"},
                "upstreams": [{"name": "a", "url": "https://a", "auth_broker": {"mode": "oauth_connect"}}],
            }
        )
    )
    assert main(["config", "check", "--config", str(config)]) == 2
    assert "upstreams[0].auth_broker.token_endpoint: required" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"keyring": {"file": "k"}}))
    assert main(["config", "check", "--config", str(config)]) == 2
    assert f"no keyring at {tmp_path / 'k'}" in capsys.readouterr().err  # config check opens it
    main(["keys", "generate", "--output", str(tmp_path / "k")])
    capsys.readouterr()
    assert main(["config", "check", "--config", str(config)]) == 0
    assert "config OK" in capsys.readouterr().out


def test_serve_refuses_to_start_without_a_keyring(tmp_path: Path, auth_server: AuthServer) -> None:
    from tests.live import write_config

    config = write_config(tmp_path, auth_server, auth_server.new_client(), 0)
    result = _run("serve", "--config", str(config))
    assert result.returncode == 2
    assert f"no keyring at {tmp_path / 'keyring.json'}" in result.stderr
    assert "credential-broker keys generate --output" in result.stderr


def test_serve_refuses_a_wrong_keyring(tmp_path: Path, auth_server: AuthServer) -> None:
    live = start_live_broker(tmp_path, auth_server)
    live.connect("alice")
    assert live.stop() == 0
    (tmp_path / "keyring.json").unlink()
    assert _run("keys", "generate", "--output", str(tmp_path / "keyring.json")).returncode == 0
    result = _run("serve", "--config", str(live.config_path))
    assert result.returncode == 2
    assert "key ids not in the keyring" in result.stderr


def test_live_broker_serves_tcp_and_unix_and_stops_gracefully(live_broker: LiveBroker) -> None:
    done = live_broker.connect("alice")
    assert done.credential.user_id == "alice"
    with grpc.insecure_channel(live_broker.socket_target) as channel:
        answer = pb_grpc.CredentialBrokerStub(channel).Resolve(
            pb.ResolveRequest(user_id="alice", upstream=live_broker.upstream), metadata=(REQUEST_HEADER,)
        )
    assert answer.header_value == f"Bearer {answer.access_token}"
    sock = Path(live_broker.socket_target.removeprefix("unix://"))
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    assert live_broker.stop(signal.SIGTERM) == 0
    events = [json.loads(line) for line in live_broker.logs().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events if "event" in e]  # the rest are audit events on stdout
    assert "serving" in names and names[-1] == "stopped"
    assert not sock.exists()
    log_text = live_broker.logs()
    for secret in live_broker.auth.issued:
        assert secret not in log_text


def test_embedded_default_starts_with_no_config(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--listen", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=20)
        stub = pb_grpc.CredentialBrokerStub(channel)
        started = stub.BuildAuthorizationURL(
            pb.BuildAuthorizationURLRequest(user_id="alice", upstream="example"), metadata=(REQUEST_HEADER,)
        )
        assert started.authorization_url.startswith("https://auth.example.com/oauth/authorize?")
        channel.close()
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
    assert process.returncode == 0, output
    assert stat.S_IMODE(os.stat(tmp_path / "credential-broker-data" / "dev-keyring.json").st_mode) == 0o600
    assert "embedded development config" in output


def test_bad_listen_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--listen", "nowhere"]) == 2
    assert "expected host:port or unix:///path" in capsys.readouterr().err
