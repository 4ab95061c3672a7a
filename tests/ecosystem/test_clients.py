"""The example clients in examples/clients build and behave the same in every language.

Each client: ``resolve --user U --upstream NAME [--target T]`` prints
``OK <header_name> <token_type> <expires_at|none> token_len=N`` (exit 0), or
``NOT_CONNECTED <authorization_url>`` (exit 3), or the gRPC status code name (exit 1).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    BUILD_TIMEOUT,
    CLIENTS,
    LANGUAGES,
    BuiltClient,
    check,
    client_env,
    closed_tcp_target,
    find_tool,
    require_tool,
    run,
    unique_user,
)

pytestmark = [pytest.mark.ecosystem, pytest.mark.timeout(BUILD_TIMEOUT)]

OK_LINE = re.compile(r"^OK Authorization Bearer (none|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) token_len=([1-9]\d*)$")
NOT_CONNECTED_LINE = re.compile(r"^NOT_CONNECTED (https?://\S+)$")

Build = Callable[[str], BuiltClient]


def _stdout_line(proc: Any) -> str:
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"want one stdout line, got {proc.stdout!r} (stderr {proc.stderr!r})"
    return str(lines[0])


@pytest.mark.parametrize("language", LANGUAGES)
def test_client_builds(build_client: Build, language: str) -> None:
    assert build_client(language).argv


def test_go_generated_code_is_current(tmp_path: Path) -> None:
    """The Go client is built on the Go SDK (clients/go): its internal/gen is what its gen.sh
    makes from proto/ (protoc-gen-go via grpcio-tools' protoc)."""
    require_tool("go")
    plugins = [require_tool("protoc-gen-go"), require_tool("protoc-gen-go-grpc")]
    src = CLIENTS.parents[1] / "clients" / "go"
    env = client_env(OUT=str(tmp_path), PYTHON=sys.executable, GOBIN=str(Path(plugins[0]).parent))
    check(run(["bash", str(src / "gen.sh")], cwd=src, env=env), "gen.sh")
    committed = sorted(p.relative_to(src) for p in (src / "internal").rglob("*.go"))
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "internal").rglob("*.go"))
    assert generated == committed
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (src / p).read_bytes()]
    assert not stale, f"regenerate with clients/go/gen.sh: {stale}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_unreachable_broker_is_reported_by_code_name(build_client: Build, language: str) -> None:
    client = build_client(language)
    proc = client.resolve("alice", "github", target=closed_tcp_target())
    assert proc.returncode == 1, proc
    assert _stdout_line(proc) == "UNAVAILABLE"


@pytest.mark.parametrize("language", LANGUAGES)
def test_connected_user_gets_header(build_client: Build, eco_broker: Any, language: str) -> None:
    client = build_client(language)
    user = unique_user(f"eco-{language}")
    eco_broker.connect(user)
    proc = client.resolve(user, eco_broker.upstream, target=eco_broker.target)
    assert proc.returncode == 0, proc
    assert OK_LINE.match(_stdout_line(proc)), proc.stdout


@pytest.mark.parametrize("language", LANGUAGES)
def test_unconnected_user_gets_authorization_url(build_client: Build, eco_broker: Any, language: str) -> None:
    client = build_client(language)
    proc = client.resolve(unique_user(f"eco-{language}-new"), eco_broker.upstream, target=eco_broker.target)
    assert proc.returncode == 3, proc
    assert NOT_CONNECTED_LINE.match(_stdout_line(proc)), proc.stdout


@pytest.mark.parametrize("language", LANGUAGES)
def test_target_from_socket_env(build_client: Build, eco_broker: Any, language: str) -> None:
    """With no --target the client dials $CREDENTIAL_BROKER_SOCKET (here the unix socket)."""
    client = build_client(language)
    user = unique_user(f"eco-{language}-uds")
    eco_broker.connect(user)
    env = client_env(CREDENTIAL_BROKER_SOCKET=eco_broker.socket_target)
    proc = client.resolve(user, eco_broker.upstream, env=env)
    assert proc.returncode == 0, proc
    assert OK_LINE.match(_stdout_line(proc)), proc.stdout


def test_clients_print_identical_lines(build_client: Build, eco_broker: Any) -> None:
    """Same credential, same line, whatever the language (the token never appears)."""
    available = [lang for lang in LANGUAGES if _toolchain_present(lang)]
    if len(available) < 2:
        pytest.skip("fewer than two client toolchains installed")
    user = unique_user("eco-same")
    eco_broker.connect(user)
    lines = {}
    for language in available:
        proc = build_client(language).resolve(user, eco_broker.upstream, target=eco_broker.target)
        assert proc.returncode == 0, proc
        lines[language] = _stdout_line(proc)
    assert len(set(lines.values())) == 1, lines


def _toolchain_present(language: str) -> bool:
    needed = {"go": ["go"], "node": ["node", "npm"], "java": ["mvn", "java"], "python": []}
    return all(find_tool(tool) for tool in needed[language])
