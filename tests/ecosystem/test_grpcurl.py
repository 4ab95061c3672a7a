"""The README's grpcurl examples work, as written, against a live broker (reflection only).

The commands are the lines starting with ``grpcurl`` between the README markers
``<!-- grpcurl-examples:start -->`` and ``<!-- grpcurl-examples:end -->`` (a trailing
backslash continues a line). Placeholders substituted here: the address
``127.0.0.1:50051`` becomes the live broker's; in a ``-d`` JSON body the ``upstream``
becomes the live broker's configured upstream, and Resolve's ``user_id`` becomes a
user who is certainly not connected.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, require_tool, run, unique_user

pytestmark = pytest.mark.ecosystem

README = REPO / "README.md"
START, END = "<!-- grpcurl-examples:start -->", "<!-- grpcurl-examples:end -->"
PLACEHOLDER = "127.0.0.1:50051"
REQUIRED_KINDS = {"list", "describe", "health", "build_authorization_url", "resolve"}


def readme_commands(readme: Path = README) -> list[str] | None:
    """The grpcurl command lines of the README's examples block; None without a README."""
    if not readme.is_file():
        return None
    text = readme.read_text()
    if START not in text or END not in text:
        return []
    block = text.split(START, 1)[1].split(END, 1)[0]
    block = re.sub(r"\\\n\s*", " ", block)  # join continued lines
    return [line.strip() for line in block.splitlines() if line.strip().startswith("grpcurl")]


def kind_of(argv: list[str]) -> str:
    if any(a.endswith("/BuildAuthorizationURL") for a in argv):
        return "build_authorization_url"
    if any(a.endswith("/Resolve") for a in argv):
        return "resolve"
    if any(a.endswith("grpc.health.v1.Health/Check") for a in argv):
        return "health"
    if "describe" in argv:
        return "describe"
    if argv[-1] == "list" or "list" in argv:
        return "list"
    return "other"


def _params() -> list[Any]:
    commands = readme_commands()
    if not commands:
        reason = (
            "README.md is not on this branch yet"
            if commands is None
            else f"README.md has no grpcurl commands between {START} and {END}"
        )
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-readme-examples")]
    return [
        pytest.param(command, id=f"{i}-{kind_of(shlex.split(command))}") for i, command in enumerate(commands)
    ]


def test_readme_has_the_required_examples() -> None:
    commands = readme_commands()
    if commands is None:
        pytest.skip("README.md is not on this branch yet")
    assert commands, f"README.md needs grpcurl commands between {START} and {END}"
    kinds = {kind_of(shlex.split(c)) for c in commands}
    assert kinds >= REQUIRED_KINDS, f"README grpcurl examples lack {REQUIRED_KINDS - kinds}"
    for command in commands:
        assert PLACEHOLDER in command, f"example without the {PLACEHOLDER} placeholder: {command}"


def _substitute(argv: list[str], kind: str, live: Any) -> list[str]:
    out = [live.target if a == PLACEHOLDER else a.replace(PLACEHOLDER, live.target) for a in argv]
    for i, arg in enumerate(out[:-1]):
        if arg in ("-d", "--d", "-data", "--data"):
            body = json.loads(out[i + 1])
            if "upstream" in body:
                body["upstream"] = live.upstream
            if kind == "resolve" and ("user_id" in body or "userId" in body):
                body.pop("userId", None)
                body["user_id"] = unique_user("eco-grpcurl-new")
            out[i + 1] = json.dumps(body)
    return out


@pytest.mark.parametrize("command", _params())
def test_readme_grpcurl_example(command: str, eco_broker: Any) -> None:
    grpcurl = require_tool("grpcurl")
    argv = shlex.split(command)
    kind = kind_of(argv)
    argv = [grpcurl, *_substitute(argv[1:], kind, eco_broker)]
    proc = run(argv)
    out, err = proc.stdout, proc.stderr
    context = f"$ {shlex.join(argv)}\nexit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"

    if kind == "resolve":
        # grpcurl exits 64 + the status code; FAILED_PRECONDITION is 9.
        assert proc.returncode == 64 + 9, context
        assert "Code: FailedPrecondition" in err, context
        assert "NOT_CONNECTED" in err, context
        assert re.search(r'"authorization_url": "https?://', err), context
        return

    assert proc.returncode == 0, context
    if kind == "list":
        assert "credentialbroker.v1.CredentialBroker" in out.split(), context
    elif kind == "describe":
        assert "credentialbroker.v1.CredentialBroker is a service:" in out, context
        for rpc in ("BuildAuthorizationURL", "Complete", "Deny", "Refresh", "Resolve"):
            assert f"rpc {rpc} (" in out, context
    elif kind == "health":
        assert json.loads(out)["status"] == "SERVING", context
    elif kind == "build_authorization_url":
        response = json.loads(out)
        url = response.get("authorization_url", response.get("authorizationUrl", ""))
        assert url.startswith(("http://", "https://")), context
        assert response.get("state"), context
