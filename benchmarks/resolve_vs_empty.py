"""Resolve on a cached credential vs an empty RPC, on the same server and transport.

Starts benchmarks/server.py in a subprocess (so client and server do not share a GIL), then, for
each store backend (SQLite, PostgreSQL), TCP loopback and the unix socket, at 1, 32 and 256
concurrent callers, measures the two calls in paired rounds (ABBA order) and prints p50, p99 and
calls/s for each, and the ratios Resolve/Empty: the median of the rounds' ratios.

Targets: Resolve p50 <= 1.25x the empty RPC's, throughput >= 0.8x.

    .venv/bin/python benchmarks/resolve_vs_empty.py [--seconds 1] [--rounds 6]
        [--backend sqlite|postgres|both] [--dsn DSN] [--callers 1,32,256]

PostgreSQL: --dsn, else $CREDENTIAL_BROKER_TEST_PG_DSN, else a throwaway cluster started from
the local initdb/pg_ctl (a fresh schema each run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc

HEADER = (("x-credential-broker-request", "true"),)


async def measure(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[list[float], float]:
    """Latencies (s) of every call and calls/s, with ``concurrency`` callers for ``seconds``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, len(latencies) / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def bench_server(
    backend: str, dsn: str | None, users: int = 1, loop: str = "uvloop"
) -> Iterator[dict[str, str]]:
    """benchmarks/server.py in a subprocess; yields its addresses."""
    command = [sys.executable, str(Path(__file__).with_name("server.py")), "--users", str(users)]
    command += ["--event-loop", loop]
    command += ["--backend", backend] + (["--dsn", dsn] if dsn else [])
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        yield json.loads(server.stdout.readline())
    finally:
        server.terminate()
        server.wait(10)


async def bench_target(
    target: str, seconds: float, rounds: int, callers: Sequence[int] = (1, 32, 256)
) -> list[dict[str, object]]:
    rows = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        empty = channel.unary_unary("/bench.Bench/Empty", request_serializer=None, response_deserializer=None)
        request = pb.ResolveRequest(user_id="user-0", upstream="bench")

        async def resolve() -> object:
            return await stub.Resolve(request, metadata=HEADER)

        async def nothing() -> object:
            return await empty(b"", metadata=HEADER)

        answer = await stub.Resolve(request, metadata=HEADER)
        assert answer.access_token == "access-0", "the benchmark credential did not resolve"
        await measure(nothing, 4, 0.5)  # warm up both paths
        await measure(resolve, 4, 0.5)
        for concurrency in callers:
            samples: dict[str, list[float]] = {"resolve": [], "empty": []}
            rates: dict[str, list[float]] = {"resolve": [], "empty": []}
            p50_ratios: list[float] = []
            rate_ratios: list[float] = []
            for round_ in range(rounds):
                # Paired rounds, in ABBA order so drift hits both calls alike; a cell's ratio is
                # the median of its rounds' ratios (robust to a noisy round on a shared machine).
                order = (("empty", nothing), ("resolve", resolve))
                measured: dict[str, tuple[list[float], float]] = {}
                for name, fn in order if round_ % 2 == 0 else order[::-1]:
                    measured[name] = await measure(fn, concurrency, seconds)
                    samples[name] += measured[name][0]
                    rates[name].append(measured[name][1])
                p50_ratios.append(pct(measured["resolve"][0], 0.5) / pct(measured["empty"][0], 0.5))
                rate_ratios.append(measured["resolve"][1] / measured["empty"][1])
            row: dict[str, object] = {"concurrency": concurrency}
            for name in ("empty", "resolve"):
                row[f"{name}_p50_us"] = pct(samples[name], 0.5) * 1e6
                row[f"{name}_p99_us"] = pct(samples[name], 0.99) * 1e6
                row[f"{name}_rps"] = statistics.median(rates[name])
            row["p50_ratio"] = statistics.median(p50_ratios)
            row["rps_ratio"] = statistics.median(rate_ratios)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=6, help="paired rounds per cell")
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: see above)")
    parser.add_argument("--callers", default="1,32,256", help="comma-separated concurrency levels")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop", help="the server's")
    args = parser.parse_args()
    callers = [int(c) for c in args.callers.split(",")]
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    print(
        f"{'store':8} {'transport':9} {'callers':>7} {'empty p50':>10} {'resolve p50':>12} {'p50 x':>6} "
        f"{'empty p99':>10} {'resolve p99':>12} {'empty/s':>8} {'resolve/s':>10} {'rate x':>7}"
    )
    ok = True
    for backend in backends:
        with contextlib.ExitStack() as stack:
            dsn = None
            if backend == "postgres":
                from benchmarks.seeding import postgres_dsn

                dsn = stack.enter_context(postgres_dsn(args.dsn))
            addresses = stack.enter_context(bench_server(backend, dsn, loop=args.event_loop))
            for transport in ("tcp", "unix"):
                rows = asyncio.run(bench_target(addresses[transport], args.seconds, args.rounds, callers))
                for row in rows:
                    print(
                        f"{backend:8} {transport:9} {row['concurrency']:>7} {row['empty_p50_us']:>8.0f}us "
                        f"{row['resolve_p50_us']:>10.0f}us {row['p50_ratio']:>6.2f} {row['empty_p99_us']:>8.0f}us "
                        f"{row['resolve_p99_us']:>10.0f}us {row['empty_rps']:>8.0f} {row['resolve_rps']:>10.0f} "
                        f"{row['rps_ratio']:>7.2f}",
                        flush=True,
                    )
                    ok &= row["p50_ratio"] <= 1.25 and row["rps_ratio"] >= 0.8  # type: ignore[operator]
    print("targets (p50 <= 1.25x, rate >= 0.8x):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
