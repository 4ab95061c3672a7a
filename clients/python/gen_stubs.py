"""Regenerate src/credential_broker_client/_proto from the repository's proto/ and this package's
proto/ (run: python clients/python/gen_stubs.py [--check]; needs grpcio-tools).

grpc_tools writes absolute imports (``from credentialbroker.v1 import broker_pb2``); they are
rewritten to live under ``credential_broker_client._proto``, so the installed package carries its
own stubs and needs no sys.path games. With --check the exit code says whether the committed
files are current.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
REPO_PROTO = HERE.parent.parent / "proto"
OWN_PROTO = HERE / "proto"
OUT = HERE / "src" / "credential_broker_client" / "_proto"
PACKAGE = "credential_broker_client._proto"


def generate(out: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    jobs = [
        (REPO_PROTO, ["credentialbroker/v1/broker.proto"], True),
        (OWN_PROTO, ["credential_broker_client/rpc_status.proto"], False),
    ]
    for root, protos, grpc_out in jobs:
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out}", *protos]
        if grpc_out:
            args.insert(-1, f"--grpc_python_out={out}")
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {root}")
    for path in out.rglob("*.py"):
        text = path.read_text()
        text = text.replace("from credentialbroker.v1 import", f"from {PACKAGE}.credentialbroker.v1 import")
        path.write_text(text)
    for folder in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()


def differences(a: Path, b: Path) -> list[str]:
    """Files that differ between two trees (either side missing counts)."""
    names = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    names |= {
        p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    return sorted(
        n
        for n in names
        if not ((a / n).exists() and (b / n).exists() and filecmp.cmp(a / n, b / n, shallow=False))
    )


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp) / "_proto"
        generated.mkdir()
        generate(generated)
        if check:
            stale = differences(generated, OUT)
            for name in stale:
                print(f"out of date: clients/python/src/credential_broker_client/_proto/{name}")
            return 1 if stale else 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(generated, OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
