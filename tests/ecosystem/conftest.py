"""Shared helpers for the ecosystem checks (example clients, grpcurl, buf).

These tests drive external toolchains (go, node/npm, mvn/java, grpcurl, buf).
A test skips, naming the missing binary, only when a toolchain is absent; CI
runs scripts/ci/install-tools.sh first so that they all run there.

The live broker comes from the ``live_broker`` fixture of tests/conftest.py:
an object with ``.target`` ("127.0.0.1:PORT"), ``.socket_target``
("unix:///...sock"), ``.upstream`` (an oauth_connect upstream) and
``.connect(user)``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENTS = REPO / "examples" / "clients"
LANGUAGES = ("go", "node", "java", "python")
INSTALL_HINT = "run scripts/ci/install-tools.sh and put GOBIN on PATH"

# Generous per-test limits: the first build of a client may download its dependencies.
BUILD_TIMEOUT = 900
RUN_TIMEOUT = 60


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated here so the directory works on its own.
    config.addinivalue_line("markers", "ecosystem: drives external toolchains (go, node, mvn, grpcurl, buf)")


def find_tool(name: str) -> str | None:
    """The tool on PATH, else in Go's install directory (where install-tools.sh puts it)."""
    found = shutil.which(name)
    if found:
        return found
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    dirs = [os.environ.get("GOBIN"), *(str(Path(p) / "bin") for p in gopath.split(os.pathsep))]
    for folder in filter(None, dirs):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tool(name: str) -> str:
    tool = find_tool(name)
    if tool is None:
        pytest.skip(f"{name} is not installed ({INSTALL_HINT})")
    return tool


def run(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        command = " ".join(map(str, proc.args))
        pytest.fail(
            f"{what} failed (exit {proc.returncode})\n$ {command}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )


def client_env(**extra: str) -> dict[str, str]:
    """The environment for running a client: no inherited broker target."""
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIAL_BROKER_SOCKET"}
    env.update(extra)
    return env


def unique_user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def closed_tcp_target() -> str:
    """A loopback address with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@dataclass(frozen=True)
class BuiltClient:
    language: str
    argv: list[str]  # prefix; append ["resolve", "--user", ...]

    def resolve(
        self, user: str, upstream: str, target: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [*self.argv, "resolve", "--user", user, "--upstream", upstream]
        if target is not None:
            argv += ["--target", target]
        return run(argv, cwd=CLIENTS / self.language, env=env or client_env())


def _build_go(out: Path) -> BuiltClient:
    go = require_tool("go")
    src = CLIENTS / "go"
    binary = out / "cbclient"
    check(run([go, "build", "-o", str(binary), "."], cwd=src, timeout=BUILD_TIMEOUT), "go build")
    return BuiltClient("go", [str(binary)])


def _build_node(out: Path) -> BuiltClient:
    node = require_tool("node")
    npm = require_tool("npm")
    src = CLIENTS / "node"
    proc = run([npm, "ci", "--no-audit", "--no-fund"], cwd=src, timeout=BUILD_TIMEOUT)
    check(proc, "npm ci")
    return BuiltClient("node", [node, str(src / "client.js")])


def _build_java(out: Path) -> BuiltClient:
    mvn = require_tool("mvn")
    java = require_tool("java")
    src = CLIENTS / "java"
    # Offline first (fast, no network); the very first build resolves online into ~/.m2.
    proc = run([mvn, "-B", "-q", "-o", "package"], cwd=src, timeout=BUILD_TIMEOUT)
    if proc.returncode != 0:
        proc = run([mvn, "-B", "-q", "package"], cwd=src, timeout=BUILD_TIMEOUT)
    check(proc, "mvn package")
    return BuiltClient("java", [java, "-jar", str(src / "target" / "cbclient.jar")])


def _build_python(out: Path) -> BuiltClient:
    src = CLIENTS / "python"
    # The client is built on the SDK (clients/python, installed by .ci/run): it must import.
    check(
        run([sys.executable, "-c", "import client, credential_broker_client"], cwd=src),
        "python client import",
    )
    return BuiltClient("python", [sys.executable, str(src / "client.py")])


BUILDERS: dict[str, Callable[[Path], BuiltClient]] = {
    "go": _build_go,
    "node": _build_node,
    "java": _build_java,
    "python": _build_python,
}


@pytest.fixture(scope="session")
def build_client(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], BuiltClient]:
    """Builds a language's client once per session (a failed build fails every user)."""
    built: dict[str, BuiltClient] = {}

    def build(language: str) -> BuiltClient:
        if language not in built:
            built[language] = BUILDERS[language](tmp_path_factory.mktemp(f"client-{language}"))
        return built[language]

    return build


@pytest.fixture
def eco_broker(request: pytest.FixtureRequest) -> Any:
    """The live broker from tests/conftest.py's ``live_broker`` fixture, or a clear skip.

    Named so as not to shadow tests/conftest.py's own ``broker`` fixture.
    """
    try:
        return request.getfixturevalue("live_broker")
    except pytest.FixtureLookupError:
        pytest.skip("the live_broker fixture (tests/conftest.py, with the broker core) is missing")
