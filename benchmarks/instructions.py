"""Instructions the server executes per call: Resolve on a cached credential vs the empty RPC.

Runs benchmarks/server.py under valgrind's callgrind (user-space instructions, all threads),
switches counting on only around a burst of N calls of one kind (callgrind_control), and
prints instructions per call for each and the ratio. Unlike timings, on a quiet machine the
count repeats to about 0.5%, so it shows what a change to the Resolve path costs (heavy work
running beside it makes gRPC's threads wake more often and adds a few percent to both). It leaves out kernel time (system calls, context switches), which both calls share.

    .venv/bin/python benchmarks/instructions.py [--calls 1000] [--callers 8]

Needs valgrind (Debian package valgrind). A run takes about a minute: the server runs ~50x
slower under callgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.resolve_vs_empty import HEADER
from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _collected(out_dir: Path) -> int:
    """Sum the instruction totals of the dumps in out_dir, then remove them."""
    total = 0
    for dump in out_dir.glob("callgrind.out*"):
        for line in dump.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total += int(line.split()[1])
                break
        dump.unlink()
    return total


async def _count(target: str, pid: int, out_dir: Path, calls: int, callers: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        empty = channel.unary_unary("/bench.Bench/Empty", request_serializer=None, response_deserializer=None)
        request = pb.ResolveRequest(user_id="user-0", upstream="bench")
        kinds: dict[str, Callable[[], Awaitable[object]]] = {
            "empty": lambda: empty(b"", metadata=HEADER),
            "resolve": lambda: stub.Resolve(request, metadata=HEADER),
        }
        per_call: dict[str, float] = {}
        for name, call in kinds.items():
            for _ in range(50):  # warm up this path before counting
                await call()
            _control(pid, "--zero")

            async def caller(call: Callable[[], Awaitable[object]] = call) -> None:
                for _ in range(calls // callers):
                    await call()

            await asyncio.gather(*(caller() for _ in range(callers)))
            _control(pid, "--dump")
            await asyncio.sleep(1)  # the dump is written asynchronously
            per_call[name] = _collected(out_dir) / (calls // callers * callers)
    return per_call


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="calls counted per kind")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cb-callgrind-") as tmp:
        out_dir = Path(tmp)
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=no",
                f"--callgrind-out-file={out_dir}/callgrind.out.%p",
                sys.executable,
                str(Path(__file__).with_name("server.py")),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            addresses = json.loads(server.stdout.readline())
            _collected(out_dir)
            counts = asyncio.run(_count(addresses["unix"], server.pid, out_dir, args.calls, args.callers))
        finally:
            server.terminate()
            server.wait(60)
    print(f"empty RPC  {counts['empty']:>10,.0f} instructions per call")
    print(f"Resolve    {counts['resolve']:>10,.0f} instructions per call")
    print(f"ratio      {counts['resolve'] / counts['empty']:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
