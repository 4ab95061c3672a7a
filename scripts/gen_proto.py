"""Regenerate broker/_proto from proto/ (run: python scripts/gen_proto.py [--check]).

grpc_tools writes absolute imports (``from credentialbroker.v1 import broker_pb2``); they
are rewritten to live under ``broker._proto`` so the generated code needs no sys.path games.
With --check the generated files are compared with the committed ones and the exit code says
whether they are up to date.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "broker" / "_proto"
PROTOS = ["credentialbroker/v1/broker.proto"]


def generate(out: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        text = text.replace("from credentialbroker.v1 import", "from broker._proto.credentialbroker.v1 import")
        path.write_text(text)
    for folder in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp) / "_proto"
        generated.mkdir()
        generate(generated)
        if check:
            stale = _differences(generated, OUT)
            for name in stale:
                print(f"out of date: broker/_proto/{name}")
            return 1 if stale else 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(generated, OUT)
    return 0


def _differences(a: Path, b: Path) -> list[str]:
    names = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    names |= {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return sorted(n for n in names if not ((a / n).exists() and (b / n).exists() and filecmp.cmp(a / n, b / n, shallow=False)))


if __name__ == "__main__":
    raise SystemExit(main())
