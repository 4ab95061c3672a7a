"""buf lint and buf breaking (scripts/ci/buf-check.sh) guard the released contract.

The baseline is proto/released/v0.1.0.binpb, a buf image of the 0.1.0 contract.
Each test runs the check on a temp copy of buf.yaml + proto/ with one change.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import REPO, require_tool, run

pytestmark = pytest.mark.ecosystem

BUF_CHECK = REPO / "scripts" / "ci" / "buf-check.sh"
BROKER_PROTO = Path("proto") / "credentialbroker" / "v1" / "broker.proto"


@pytest.fixture
def buf() -> str:
    return require_tool("buf")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy2(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    return tmp_path


def _edit(workspace: Path, change: Callable[[str], str]) -> None:
    path = workspace / BROKER_PROTO
    before = path.read_text()
    after = change(before)
    assert after != before, "the edit did not apply; update the test to the current proto"
    path.write_text(after)


def _buf_check(buf: str, workspace: Path | None = None) -> tuple[int, str]:
    # buf may be in GOBIN without GOBIN being on PATH.
    env = {**os.environ, "PATH": f"{Path(buf).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    argv = ["bash", str(BUF_CHECK)] + ([str(workspace)] if workspace else [])
    proc = run(argv, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def test_released_baseline_is_committed() -> None:
    assert (REPO / "proto" / "released" / "v0.1.0.binpb").stat().st_size > 0


def test_repository_contract_passes(buf: str) -> None:
    code, output = _buf_check(buf)
    assert code == 0, output


def test_unchanged_copy_passes(buf: str, workspace: Path) -> None:
    code, output = _buf_check(buf, workspace)
    assert code == 0, output


def test_renumbered_field_fails_breaking(buf: str, workspace: Path) -> None:
    _edit(
        workspace,
        lambda s: s.replace("uint32 min_valid_seconds = 4;", "uint32 min_valid_seconds = 9;"),
    )
    code, output = _buf_check(buf, workspace)
    assert code != 0, output
    assert "ResolveRequest" in output, output


def test_removed_rpc_fails_breaking(buf: str, workspace: Path) -> None:
    _edit(workspace, lambda s: s.replace("  rpc Deny(DenyRequest) returns (DenyResponse);\n", ""))
    code, output = _buf_check(buf, workspace)
    assert code != 0, output
    assert "Deny" in output, output


def test_added_field_is_not_breaking(buf: str, workspace: Path) -> None:
    _edit(
        workspace,
        lambda s: s.replace(
            "  string header_value = 7;\n", "  string header_value = 7;\n  string note = 99;\n"
        ),
    )
    code, output = _buf_check(buf, workspace)
    assert code == 0, output


def test_lint_violation_fails(buf: str, workspace: Path) -> None:
    _edit(workspace, lambda s: s.replace("string obtained_via = 5;", "string obtainedVia = 5;"))
    code, output = _buf_check(buf, workspace)
    assert code != 0, output
    assert "obtainedVia" in output, output
