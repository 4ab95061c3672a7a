"""Scale-out benchmarks, each measured side by side in one run and printed as ratios.

    store-size   Resolve p50 with 1,000 vs 1,000,000 stored credentials (bulk-loaded). <= 1.2x
    workers      Resolve calls/s with `serve --workers 2` vs 1, same store.            >= 1.6x
    coalescing   1,000 concurrent Resolves of one stale credential -> token requests:
                 one process (SQLite) and two broker processes on one PostgreSQL.      == 1
    memory       resident set idle, then after N distinct users resolved.   idle < 100 MB

    .venv/bin/python benchmarks/suite.py [store-size|workers|coalescing|memory ...]
        [--large 1000000] [--seconds 3] [--memory-users 100000] [--backend sqlite|postgres]
        [--go-loadgen]

workers drives the load from Python client processes, or with --go-loadgen from
benchmarks/loadgen (Go, built here with `go build`), which leaves more of the cores to the broker.

The default run takes a few minutes on 2 cores. Figures on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.resolve_vs_empty import HEADER, pct  # noqa: E402 - after the sys.path line
from benchmarks.seeding import postgres_dsn  # noqa: E402 - after the sys.path line
from broker._proto.credentialbroker.v1 import broker_pb2 as pb  # noqa: E402 - after the sys.path line
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc  # noqa: E402 - after the sys.path line

SERVER = Path(__file__).with_name("server.py")


@contextlib.contextmanager
def bench_server(*args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    process = subprocess.Popen([sys.executable, str(SERVER), *args], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield process, json.loads(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(30)


async def resolve_latencies(
    target: str, users: int, seconds: float, callers: int
) -> tuple[list[float], float]:
    """Resolve random users among ``users`` for ``seconds``; latencies and calls/s."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pb_grpc.CredentialBrokerStub(ch)
        deadline = time.perf_counter() + seconds
        rng = random.Random(7)

        async def caller() -> None:
            while time.perf_counter() < deadline:
                i = rng.randrange(users)
                t0 = time.perf_counter()
                answer = await stub.Resolve(
                    pb.ResolveRequest(user_id=f"user-{i}", upstream="bench"), metadata=HEADER
                )
                latencies.append(time.perf_counter() - t0)
                assert answer.access_token == f"access-{i}"

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return latencies, len(latencies) / (time.perf_counter() - started)


# -- 2. store size ---------------------------------------------------------------------------------


def store_size(args: argparse.Namespace) -> bool:
    results = {}
    for users in (1000, args.large):
        with contextlib.ExitStack() as stack:
            extra = []
            if args.backend == "postgres":
                extra = ["--backend", "postgres", "--dsn", stack.enter_context(postgres_dsn(args.dsn))]
            _, info = stack.enter_context(bench_server("--users", str(users), *extra))
            # Warm both the server and the client, then measure distinct random users.
            asyncio.run(resolve_latencies(info["tcp"], users, 0.5, 1))
            samples: list[float] = []
            for _ in range(3):
                lat, _ = asyncio.run(resolve_latencies(info["tcp"], users, args.seconds / 3, 1))
                samples += lat
            results[users] = pct(samples, 0.5) * 1e6
            print(
                f"  {users:>9} credentials: load {info['load_seconds']:.1f}s, Resolve p50 {results[users]:.0f}us"
            )
    ratio = results[args.large] / results[1000]
    print(f"store-size ({args.backend}): p50 {args.large} / 1000 = {ratio:.2f}  (target <= 1.2)")
    return ratio <= 1.2


# -- 3. workers -----------------------------------------------------------------------------------


def _client_proc(target: str, users: int, seconds: float, callers: int, out: Any) -> None:
    _, rate = asyncio.run(resolve_latencies(target, users, seconds, callers))
    out.put(rate)


def _serve_config(tmp: Path, port: int, store: dict[str, Any], token_endpoint: str) -> Path:
    doc = {
        "listen": [f"127.0.0.1:{port}"],
        "store": store,
        "keyring": {"file": str(tmp / "keyring.json")},
        "log": {"level": "error"},
        # An audit event per Resolve, as in production; appended to a file so stdout stays quiet.
        "audit": {"output": "file", "path": str(tmp / f"audit-{port}.jsonl")},
        "upstreams": [
            {
                "name": "bench",
                "url": "https://api.bench.test",
                "auth_broker": {
                    "mode": "oauth_connect",
                    "authorization_endpoint": "https://as.bench.test/authorize",
                    "token_endpoint": token_endpoint,
                    "client_id": "bench",
                    "token_endpoint_auth_method": "none",
                    "redirect_uri": "https://app.bench.test/cb",
                },
            }
        ],
    }
    path = tmp / f"config-{port}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def cli_broker(config: Path, workers: int) -> Iterator[tuple[str, int]]:
    """`serve --workers N` on the config's first listener: yields (target, pid)."""
    target = yaml.safe_load(config.read_text())["listen"][0]
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(config), "--workers", str(workers)],
        cwd=ROOT,
    )
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        time.sleep(1.0)  # every worker bound
        yield target, process.pid
    finally:
        process.terminate()
        process.wait(30)


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and its children (the broker's workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            pid, rest = stat.read_text().split(" (", 1)
            fields = rest.rsplit(") ", 1)[1].split()
            if int(pid) == root or int(fields[1]) == root:  # fields[1]: the parent pid
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


class _CpuUse:
    """Cores busy while a measurement runs: the whole machine and the broker's processes."""

    def __init__(self, broker_pid: int) -> None:
        self._pid = broker_pid
        self._machine = _machine_jiffies()
        self._broker = _tree_cpu_seconds(broker_pid)
        self._started = time.monotonic()

    def cores(self) -> tuple[float, float]:
        """(machine, broker) cores used since construction."""
        busy, total = _machine_jiffies()
        machine = (busy - self._machine[0]) / max(1, total - self._machine[1]) * (os.cpu_count() or 1)
        broker = (_tree_cpu_seconds(self._pid) - self._broker) / (time.monotonic() - self._started)
        return machine, broker


def workers(args: argparse.Namespace) -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="cb-bench-workers-"))
    users = 1000
    loadgen = None
    if args.go_loadgen:  # benchmarks/loadgen, built with the local Go toolchain
        loadgen = tmp / "loadgen"
        subprocess.run(
            ["go", "build", "-o", str(loadgen), "."], cwd=Path(__file__).with_name("loadgen"), check=True
        )
    with bench_server("--dir", str(tmp), "--users", str(users)):
        pass  # seeds tmp/broker.db and tmp/keyring.json
    rates = {}
    for count in (1, 2):
        config = _serve_config(
            tmp, _free_port(), {"path": str(tmp / "broker.db")}, "https://as.bench.test/token"
        )
        with cli_broker(config, count) as (target, pid):
            if loadgen is not None:
                # A first second to warm up: connections, and every worker's read cache.
                subprocess.run(
                    [str(loadgen), "-target", target, "-seconds", "1"], capture_output=True, check=True
                )
                use = _CpuUse(pid)
                out = subprocess.run(
                    [str(loadgen), "-target", target, "-users", str(users), "-seconds", str(args.seconds)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                total = float(out.split()[0])
                label = f"Go load generator: {out.strip()}"
            else:
                ctx = multiprocessing.get_context("spawn")
                out_queue = ctx.Queue()
                clients = [
                    ctx.Process(target=_client_proc, args=(target, users, args.seconds, 64, out_queue))
                    for _ in range(args.client_procs)
                ]
                use = _CpuUse(pid)
                for c in clients:
                    c.start()
                total = sum(out_queue.get() for _ in clients)
                for c in clients:
                    c.join()
                label = f"{args.client_procs} client processes"
            machine, broker = use.cores()
            rates[count] = total
            print(
                f"  {count} worker(s): {total:.0f} Resolve calls/s ({label}); cores busy: "
                f"{machine:.2f} of {os.cpu_count()} in all, broker {broker:.2f} "
                f"({broker / total * 1e6:.0f} us of broker CPU per call)"
            )
    shutil.rmtree(tmp, ignore_errors=True)
    ratio = rates[2] / rates[1]
    print(f"workers: calls/s 2 workers / 1 = {ratio:.2f}  (target >= 1.6; {os.cpu_count()} cores, shared)")
    return bool(ratio >= 1.6)


# -- 4. coalescing --------------------------------------------------------------------------------


async def _storm(targets: list[str], n: int) -> set[str]:
    channels = [
        grpc.aio.insecure_channel(t, options=[("grpc.use_local_subchannel_pool", 1)]) for t in targets
    ]
    try:
        stubs = [pb_grpc.CredentialBrokerStub(c) for c in channels]
        request = pb.ResolveRequest(user_id="alice", upstream="bench")
        answers = await asyncio.gather(
            *(stubs[i % len(stubs)].Resolve(request, metadata=HEADER) for i in range(n))
        )
        return {a.access_token for a in answers}
    finally:
        for c in channels:
            await c.close()


def _connect_alice(target: str, auth: Any) -> None:
    stub = pb_grpc.CredentialBrokerStub(grpc.insecure_channel(target))
    started = stub.BuildAuthorizationURL(
        pb.BuildAuthorizationURLRequest(user_id="alice", upstream="bench"), metadata=HEADER
    )
    callback = auth.authorize(started.authorization_url, "alice")
    stub.Complete(
        pb.CompleteRequest(state=started.state, code=callback["code"], user_id="alice"), metadata=HEADER
    )


def coalescing(args: argparse.Namespace) -> bool:
    from tests.authserver import AuthServer, Client

    ok = True
    cases = [("1 process, SQLite", "sqlite", 1), ("2 processes, PostgreSQL", "postgres", 2)]
    for label, backend, processes in cases:
        with AuthServer(access_ttl=30) as auth, contextlib.ExitStack() as stack:
            tmp = Path(tempfile.mkdtemp(prefix="cb-bench-coalesce-"))
            subprocess.run([sys.executable, "-m", "broker", "keys", "generate", "--output", str(tmp / "keyring.json")],
                           check=True, capture_output=True, cwd=ROOT)  # fmt: skip
            auth.add_client(Client("bench", None, "none", ("https://app.bench.test/cb",)))
            store: dict[str, Any] = {"path": str(tmp / "broker.db")}
            if backend == "postgres":
                store = {
                    "backend": "postgres",
                    "dsn": stack.enter_context(postgres_dsn(args.dsn)),
                    "pool_size": 8,
                }
            targets = []
            for _ in range(processes):
                config = _serve_config(tmp, _free_port(), store, auth.token_endpoint)
                doc = yaml.safe_load(config.read_text())
                doc["upstreams"][0]["auth_broker"]["authorization_endpoint"] = auth.authorization_endpoint
                config.write_text(yaml.safe_dump(doc))
                targets.append(stack.enter_context(cli_broker(config, 1))[0])
            _connect_alice(targets[0], auth)  # access token lives 30 s: inside the 60 s window
            auth.access_ttl = 3600
            before = len(auth.token_requests("refresh_token"))
            started = time.perf_counter()
            tokens = asyncio.run(_storm(targets, 1000))
            elapsed = time.perf_counter() - started
            count = len(auth.token_requests("refresh_token")) - before
            print(
                f"  {label}: 1000 concurrent Resolves -> {count} token request(s), {len(tokens)} distinct token(s), {elapsed:.2f}s"
            )
            ok &= count == 1 and len(tokens) == 1
            stack.callback(shutil.rmtree, tmp, True)
    print("coalescing: exactly 1 token request" + (" (met)" if ok else " (NOT met)"))
    return ok


# -- 5. memory ------------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def memory(args: argparse.Namespace) -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="cb-bench-memory-"))
    users = args.memory_users
    with bench_server("--dir", str(tmp), "--users", str(users)):
        pass  # load in a separate process so the measured one starts clean
    with bench_server("--dir", str(tmp), "--users", str(users)) as (process, info):
        time.sleep(1.0)
        idle = _rss_mb(process.pid)
        marks = []
        done = 0
        for step in sorted({min(users, 10_000), users}):
            asyncio.run(_resolve_all_range(info["tcp"], done, step))
            done = step
            marks.append((step, _rss_mb(process.pid)))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"  idle: {idle:.1f} MB")
    for step, rss in marks:
        print(f"  after {step} distinct users resolved: {rss:.1f} MB")
    grown = marks[-1][1] - marks[0][1]
    print(
        f"memory: idle {idle:.1f} MB (target < 100); growth from {marks[0][0]} to {marks[-1][0]} users: {grown:+.1f} MB"
    )
    return idle < 100


async def _resolve_all_range(target: str, start: int, stop: int) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.CredentialBrokerStub(ch)
        queue = iter(range(start, stop))

        async def caller() -> None:
            for i in queue:
                await stub.Resolve(pb.ResolveRequest(user_id=f"user-{i}", upstream="bench"), metadata=HEADER)

        await asyncio.gather(*(caller() for _ in range(64)))


BENCHMARKS = {"store-size": store_size, "workers": workers, "coalescing": coalescing, "memory": memory}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", nargs="*", help="any of: " + ", ".join(BENCHMARKS))
    parser.add_argument("--large", type=int, default=1_000_000, help="store-size: the big store")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite", help="store-size")
    parser.add_argument(
        "--dsn", help="PostgreSQL DSN (default: $CREDENTIAL_BROKER_TEST_PG_DSN or a throwaway cluster)"
    )
    parser.add_argument("--client-procs", type=int, default=2, help="workers: load-generating processes")
    parser.add_argument(
        "--go-loadgen", action="store_true", help="workers: drive with benchmarks/loadgen (Go) instead"
    )
    parser.add_argument("--memory-users", type=int, default=100_000)
    args = parser.parse_args()
    verdicts = {}
    for name in args.which or list(BENCHMARKS):
        print(f"== {name}", flush=True)
        verdicts[name] = BENCHMARKS[name](args)
    print("targets:", ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in verdicts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
