"""Background refresh and WatchConnections under load (issue 14), each against a baseline
measured in the same run. Figures are printed, never asserted.

``throughput`` (SQLite and PostgreSQL): one ``broker serve`` process (default settings of
``background_refresh``, so the refresher runs in its child process, in the idle scheduling
class; ``--scheduling both`` runs it again with ``process_scheduling: nice``; ``--mode both``,
the default, runs everything again with ``separate_process: false``, the refresher as a task of
the serving process) against the test authorization server (tests/authserver.py, in its own
process; it rotates refresh tokens). ``--due`` credentials whose tokens the server really issued
are written to the store at once, all due; the script follows the server's count of refresh
grants and prints the rate the background refresher sustained, against the rate at which a plain
HTTP client sends the same kind of refresh grants straight to the server with the same
concurrency (the refresher's per-upstream slots). Then Resolve on cached credentials from 4
callers: p50/p99 with the refresher idle, and while it refreshes a batch of ``--due / --rounds``
due credentials, in ``--rounds`` ABBA-paired rounds (idle then refreshing, refreshing then idle,
...; the median of the rounds' p50 ratios is the figure, target within 1.3x), each window twice:
"paced", the callers offering ``--resolve-rate`` calls/s together (200: a busy sidecar; what a
caller waits), and "flat out", each caller calling again as soon as answered (the broker
saturated: every core is busy with the load generator, the authorization server and the broker,
so whatever the refresher uses is taken from Resolve's throughput, and the p50 ratio is about
the throughput ratio).

``watch`` (PostgreSQL): two ``broker serve`` replicas on one store. Changes (Disconnect) are
made through replica A, paced, and ``--watchers`` WatchConnections streams are open on replica
B; the latency of each delivery is its arrival time minus the event's ``at`` (the change's time
on A, just before its commit). p50/p99 with ``--watchers`` streams against one stream.

    .venv/bin/python benchmarks/background_refresh.py [throughput] [watch]
        [--due 10000] [--backend sqlite|postgres|both] [--mode process|inline|both]
        [--scheduling idle|nice|both]
        [--rounds 4] [--resolve-rate 200] [--watchers 1000] [--changes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import multiprocessing
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.resolve_vs_check import cpu_seconds
from benchmarks.seeding import insert_rows, postgres_dsn
from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import BackgroundRefreshConfig, HttpConfig, load_config
from broker.crypto import generate_keyring_file
from broker.crypto.envelope import EnvelopeCipher
from broker.crypto.keyring import FileKeySource
from broker.models import Credential, Secrets
from broker.store import open_store
from broker.vault import CredentialVault

HEADER = (("x-credential-broker-request", "true"),)
REDIRECT = "https://app.bench.test/cb"
UPSTREAM = "bench"
RESOLVE_CALLERS = 4


# -- the authorization server, in its own process -------------------------------------------


def _auth_process(pipe: Connection) -> None:
    """Serve tests/authserver.py; answer ("grants", prefix, n) and ("refreshes",) on ``pipe``."""
    from tests.authserver import AuthServer, Client

    server = AuthServer().start()
    client = server.add_client(Client("bench", None, "none", (REDIRECT,)))
    pipe.send({"token": server.token_endpoint, "authorize": server.authorization_endpoint})
    counted, refreshes = 0, 0  # requests looked at so far, refresh grants among them
    while True:
        command = pipe.recv()
        if command[0] == "grants":
            _, prefix, count = command
            pipe.send(
                [(f"{prefix}{n}", *server.issue_grant(f"{prefix}{n}", client, "read")) for n in range(count)]
            )
        elif command[0] == "refreshes":  # only the requests since the last count are parsed
            requests = server.requests
            refreshes += sum(
                1
                for r in requests[counted:]
                if r.path == "/token" and r.form.get("grant_type") == ["refresh_token"]
            )
            counted = len(requests)
            pipe.send(refreshes)
        else:
            server.stop()
            pipe.send("stopped")
            return


class AuthProcess:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._proc = context.Process(target=_auth_process, args=(child,), daemon=True)
        self._proc.start()
        self.endpoints: dict[str, str] = self._pipe.recv()

    def call(self, *command: Any) -> Any:
        self._pipe.send(command)
        return self._pipe.recv()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call("stop")
        self._proc.join(10)


# -- brokers ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _store_reads(metrics: str) -> float:
    """The broker's credential reads so far (its /metrics): Resolves not answered from memory."""
    text = httpx.get(f"http://{metrics}/metrics").text
    name = 'credential_broker_store_operation_seconds_count{operation="get_credential"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _document(
    tmp: Path,
    store: dict[str, Any],
    endpoints: dict[str, str],
    refresh: bool,
    separate: bool = True,
    interval: float = BackgroundRefreshConfig().interval_seconds,
    scheduling: str = BackgroundRefreshConfig().process_scheduling,
) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:0"],
        "store": store,
        "keyring": {"file": str(tmp / "keyring.json")},
        "log": {"level": "info"},
        "audit": {"output": "file", "path": str(tmp / "audit.jsonl")},
        "background_refresh": {
            "enabled": refresh,
            "separate_process": separate,
            "interval_seconds": interval,
            "process_scheduling": scheduling,
        },
        "upstreams": [
            {
                "name": UPSTREAM,
                "url": "https://api.bench.test",
                "auth_broker": {
                    "mode": "oauth_connect",
                    "authorization_endpoint": endpoints["authorize"],
                    "token_endpoint": endpoints["token"],
                    "client_id": "bench",
                    "token_endpoint_auth_method": "none",
                    "redirect_uri": REDIRECT,
                    "scopes": ["read"],
                },
            }
        ],
    }


@contextlib.contextmanager
def serve(document: dict[str, Any], tmp: Path, name: str) -> Iterator[tuple[str, int]]:
    """A ``broker serve`` process; yields its TCP address and process id."""
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(document))
    log = tmp / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config)], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            text = log.read_text(errors="replace")
            if "serving" in text and "addresses=" in text:
                yield text.split("addresses=")[1].split()[0].split(",")[0], proc.pid
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"broker {name} did not start: {text[-1000:]}")
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


class Seeder:
    """Writes sealed credentials straight into the broker's store (as the vault seals them)."""

    def __init__(self, document: dict[str, Any], tmp: Path) -> None:
        self.config = load_config(document, environ={}, base_dir=tmp)
        self.store = open_store(self.config.store)
        self.vault = CredentialVault(
            self.store, EnvelopeCipher(FileKeySource(self.config.keyring.file).load())
        )
        self.key = self.config.upstreams[0].key

    def write(self, users: list[tuple[str, str, str | None]], expires_in: float, age: float) -> float:
        """Credentials (user, access, refresh) expiring in ``expires_in`` s, obtained ``age`` s ago."""
        now = time.time()
        rows = []
        for user, access, refresh in users:
            credential = Credential(
                user,
                self.key,
                Secrets(access, refresh),
                "Bearer",
                ("read",),
                now + expires_in,
                "connect_flow",
                now,
            )
            row = self.vault.seal_credential(credential, now - age)
            rows.append(dataclasses.replace(row, last_refresh_at=now - age))
        started = time.perf_counter()
        insert_rows(self.store, rows)
        return time.perf_counter() - started

    def close(self) -> None:
        self.store.close()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- throughput and Resolve under refresh load ----------------------------------------------


async def _resolve_latencies(
    address: str, users: int, seconds: float, rate: float | None = None
) -> list[float]:
    """Latencies of Resolve calls by RESOLVE_CALLERS callers for ``seconds``: back to back
    (``rate`` None: as fast as the broker answers), or each caller paced so that all together
    offer ``rate`` calls/s (a start every RESOLVE_CALLERS/rate s; a late call starts at once)."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        for n in range(users):  # warm: every cached credential read once
            await stub.Resolve(pb.ResolveRequest(user_id=f"cached-{n}", upstream=UPSTREAM), metadata=HEADER)
        deadline = time.perf_counter() + seconds

        async def caller(offset: int) -> None:
            n = offset
            gap = RESOLVE_CALLERS / rate if rate else 0.0
            next_at = time.perf_counter() + gap * offset / RESOLVE_CALLERS
            while time.perf_counter() < deadline:
                if gap:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += gap
                request = pb.ResolveRequest(user_id=f"cached-{n % users}", upstream=UPSTREAM)
                t0 = time.perf_counter()
                await stub.Resolve(request, metadata=HEADER)
                latencies.append(time.perf_counter() - t0)
                n += RESOLVE_CALLERS

        await asyncio.gather(*(caller(i) for i in range(RESOLVE_CALLERS)))
    return latencies


async def _direct_rate(auth: AuthProcess, count: int, concurrency: int) -> float:
    """Refresh grants/s a plain client gets from the server at ``concurrency``."""
    grants = auth.call("grants", "direct-", count)
    queue = list(grants)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            while queue:
                _, _, refresh = queue.pop()
                answer = await client.post(
                    auth.endpoints["token"],
                    data={"grant_type": "refresh_token", "refresh_token": refresh, "client_id": "bench"},
                )
                answer.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def _follow(auth: AuthProcess, target: int, timeout: float) -> tuple[float, float]:
    """Wait until the server has answered ``target`` refresh grants; (rate/s, seconds) from the
    first to the last, sampled every 0.2 s."""
    first_at = first_count = None
    deadline = time.monotonic() + timeout
    while True:
        count, now = auth.call("refreshes"), time.perf_counter()
        if first_at is None and count > 0:
            first_at, first_count = now, count
        if count >= target:
            assert first_at is not None and first_count is not None
            elapsed = max(now - first_at, 1e-6)
            return (count - first_count) / elapsed if count > first_count else float(count), elapsed
        if time.monotonic() > deadline:
            raise SystemExit(f"only {count} of {target} refreshed in {timeout:.0f} s")
        time.sleep(0.2)


async def throughput(
    backend: str, args: argparse.Namespace, auth: AuthProcess, separate: bool, scheduling: str
) -> None:
    mode = f"child process, {scheduling}" if separate else "in-process"
    label = f"{backend:<9} {scheduling if separate else 'inline':<7}"
    with tempfile.TemporaryDirectory(prefix="cb-bench-refresh-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        generate_keyring_file(tmp / "keyring.json")
        if backend == "postgres":
            store: dict[str, Any] = {
                "backend": "postgres",
                "dsn": stack.enter_context(postgres_dsn(args.dsn)),
            }
        else:
            store = {"path": str(tmp / "broker.db")}
        document = _document(tmp, store, auth.endpoints, True, separate, args.interval, scheduling)
        metrics = f"127.0.0.1:{_free_port()}"
        document["metrics"] = {"listen": metrics}
        seeder = Seeder(document, tmp)
        stack.callback(seeder.close)
        seeder.write([(f"cached-{n}", f"cached-access-{n}", None) for n in range(args.cached)], 86400, 0)
        address, pid = stack.enter_context(serve(document, tmp, "broker"))
        slots = min(
            BackgroundRefreshConfig().max_concurrent, max(1, HttpConfig().max_concurrent_requests // 2)
        )

        base = auth.call("refreshes")
        direct = await _direct_rate(auth, min(args.due, 2000), slots)
        done = auth.call("refreshes")
        assert done - base >= min(args.due, 2000)

        # Throughput: a batch all due at once; nothing else runs.
        grants = auth.call("grants", f"due-a-{backend}-{separate}-", args.due)
        loaded = seeder.write(grants, 30, 3600)
        rate, seconds = _follow(auth, done + args.due, timeout=args.due / 2 + 120)
        print(
            f"{label} refresh ({mode}): {args.due} due (written in {loaded:.1f} s), all refreshed in "
            f"{seconds:.1f} s: {rate:.0f}/s by the background refresher vs {direct:.0f}/s sent "
            f"directly with {slots} in flight = {rate / direct:.2f}x"
        )

        # Resolve with the refresher idle and while it refreshes a batch, in ABBA-paired rounds
        # (idle then refreshing, then refreshing then idle, ...): offered at a steady rate (the
        # latency a caller sees), and back to back (as many as the broker answers).
        loads = (("paced", args.resolve_rate), ("flat out", None))
        per_round = max(1, args.due // args.rounds)
        windows: dict[tuple[str, str], list[Window]] = {}
        for n in range(args.rounds):
            for phase in ("idle", "refreshing") if n % 2 == 0 else ("refreshing", "idle"):
                target = None
                if phase == "refreshing":
                    target = auth.call("refreshes") + per_round
                    grants = auth.call("grants", f"due-{n}-{backend}-{scheduling}-{separate}-", per_round)
                    seeder.write(grants, 30, 3600)
                    while auth.call("refreshes") < target - per_round + min(50, per_round // 4 + 1):
                        await asyncio.sleep(0.05)  # the refresher has started on the batch
                for load, r in loads:
                    window = await _window(auth, address, metrics, pid, args, r, target)
                    windows.setdefault((load, phase), []).append(window)
                if target is not None:
                    _follow(auth, target, timeout=per_round / 2 + 120)
        for load, offered in loads:
            idle, busy = windows[load, "idle"], windows[load, "refreshing"]
            for when, rounds in (("idle", idle), ("refreshing", busy)):
                values = [v for w in rounds for v in w.latencies]
                print(
                    f"{label} resolve {load:<8} {when:<10} p50 {_pct(values, 0.5) * 1e6:8.0f} us  "
                    f"p99 {_pct(values, 0.99) * 1e6:8.0f} us  calls {len(values)}  "
                    f"store reads per call {statistics.mean(w.reads for w in rounds):.2f}  "
                    f"serving process CPU per call {statistics.mean(w.cpu for w in rounds) * 1e6:.0f} us"
                )
            pairs = list(zip(idle, busy, strict=True))
            p50s, p99s = (
                [_pct(b.latencies, q) / _pct(a.latencies, q) for a, b in pairs] for q in (0.5, 0.99)
            )
            rates = [w.rate for w in busy]
            offer = f"{offered:.0f}/s offered" if offered else f"{RESOLVE_CALLERS} callers back to back"
            print(
                f"{label} resolve {load} ({offer}) while the refresher ({mode}) refreshes at "
                f"{statistics.median(rates):.0f}/s (median of {len(rates)} windows; "
                f"{sum(w.batch_done for w in busy)} ran out of due credentials): p50 "
                f"{statistics.median(p50s):.2f}x idle (target <= 1.3x; rounds "
                f"{' '.join(f'{x:.2f}' for x in p50s)}), p99 {statistics.median(p99s):.2f}x"
            )


@dataclasses.dataclass
class Window:
    latencies: list[float]
    reads: float  # store reads per call in the serving process
    cpu: float  # serving process CPU seconds per call
    rate: float  # refresh grants/s the server answered meanwhile
    batch_done: bool  # the refresher ran out of due credentials before the window ended


async def _window(
    auth: AuthProcess,
    address: str,
    metrics: str,
    pid: int,
    args: argparse.Namespace,
    rate: float | None,
    target: int | None,
) -> Window:
    """One window of Resolve calls (``_resolve_latencies``) with what the serving process and the
    refresher did meanwhile; ``target``: the refresh count at which the current batch is done."""
    before, t0, read, cpu = (
        auth.call("refreshes"),
        time.perf_counter(),
        _store_reads(metrics),
        cpu_seconds(pid),
    )
    latencies = await _resolve_latencies(address, args.cached, args.seconds, rate)
    elapsed, after = time.perf_counter() - t0, auth.call("refreshes")
    calls = len(latencies) + args.cached
    return Window(
        latencies,
        (_store_reads(metrics) - read) / calls,
        (cpu_seconds(pid) - cpu) / calls,
        (after - before) / elapsed,
        target is not None and after >= target,
    )


# -- watch fan-out ---------------------------------------------------------------------------


async def _watch_latencies(
    address: str, watchers: int, changes: list[str], change_at: str, rate: float
) -> list[float]:
    """Open ``watchers`` streams on ``address``, make the changes through ``change_at``, and
    return every delivery's latency (arrival - event.at)."""
    latencies: list[float] = []
    expected = len(changes)
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, watchers // 100))]
    ready = 0
    done = asyncio.Event()
    finished = 0

    async def watch(index: int) -> None:
        nonlocal ready, finished
        stub = pb_grpc.CredentialBrokerStub(channels[index % len(channels)])
        call = stub.WatchConnections(pb.WatchConnectionsRequest(upstreams=[UPSTREAM]), metadata=HEADER)
        ready += 1
        seen = 0
        async for response in call:
            at = response.event.at.seconds + response.event.at.nanos / 1e9
            latencies.append(time.time() - at)
            seen += 1
            if seen >= expected:
                break
        call.cancel()
        finished += 1
        if finished == watchers:
            done.set()

    tasks = [asyncio.ensure_future(watch(i)) for i in range(watchers)]
    while ready < watchers:
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)  # every stream subscribed on the server
    async with grpc.aio.insecure_channel(change_at) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        for user in changes:
            await stub.Disconnect(pb.DisconnectRequest(user_id=user, upstream=UPSTREAM), metadata=HEADER)
            await asyncio.sleep(1 / rate)
    try:
        await asyncio.wait_for(done.wait(), 120)
    finally:
        for task in tasks:
            task.cancel()
        for channel in channels:
            await channel.close()
    return latencies


async def watch(args: argparse.Namespace, auth: AuthProcess) -> None:
    with tempfile.TemporaryDirectory(prefix="cb-bench-watch-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        generate_keyring_file(tmp / "keyring.json")
        store = {"backend": "postgres", "dsn": stack.enter_context(postgres_dsn(args.dsn))}
        document = _document(tmp, store, auth.endpoints, refresh=False)
        seeder = Seeder(document, tmp)
        stack.callback(seeder.close)
        users = [f"w-{n}" for n in range(2 * args.changes)]
        seeder.write([(u, f"access-{u}", None) for u in users], 86400, 0)
        a, _ = stack.enter_context(serve(document, tmp, "replica-a"))
        b, _ = stack.enter_context(serve(document, tmp, "replica-b"))
        one = await _watch_latencies(b, 1, users[: args.changes], a, args.rate)
        many = await _watch_latencies(b, args.watchers, users[args.changes :], a, args.rate)
        for label, values in (("1 watcher", one), (f"{args.watchers} watchers", many)):
            print(
                f"postgres  watch {label:<14} p50 {_pct(values, 0.5) * 1000:7.1f} ms  "
                f"p99 {_pct(values, 0.99) * 1000:7.1f} ms  deliveries {len(values)}"
            )
        print(
            f"postgres  watch fan-out: {args.changes} changes on replica A at {args.rate:.0f}/s, "
            f"p99 {args.watchers} watchers on replica B / 1 watcher = "
            f"{_pct(many, 0.99) / _pct(one, 0.99):.2f}x"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", help="throughput and/or watch (default: both)")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--cached", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0, help="each Resolve window")
    parser.add_argument(
        "--rounds", type=int, default=4, help="ABBA rounds of Resolve idle / refreshing (--due / rounds each)"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=BackgroundRefreshConfig().interval_seconds,
        help="background_refresh.interval_seconds (default: the config's default)",
    )
    parser.add_argument(
        "--resolve-rate", type=float, default=200.0, help="Resolve calls/s offered in the paced windows"
    )
    parser.add_argument(
        "--mode",
        choices=["process", "inline", "both"],
        default="both",
        help="the refresher in its own process (the default config), in the serving one, or each",
    )
    parser.add_argument(
        "--scheduling",
        choices=["idle", "nice", "both"],
        default=BackgroundRefreshConfig().process_scheduling,
        help="background_refresh.process_scheduling of the child process (default: the config's)",
    )
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5.0, help="changes per second")
    parser.add_argument("--dsn", default=None, help="PostgreSQL server (default: the test server)")
    args = parser.parse_args()
    parts = args.parts or ["throughput", "watch"]
    if not set(parts) <= {"throughput", "watch"}:
        parser.error("parts: throughput, watch")
    auth = AuthProcess()
    try:
        if "throughput" in parts:
            schedulings = ["idle", "nice"] if args.scheduling == "both" else [args.scheduling]
            for backend in ["sqlite", "postgres"] if args.backend == "both" else [args.backend]:
                for separate in {"process": [True], "inline": [False], "both": [True, False]}[args.mode]:
                    for scheduling in schedulings if separate else schedulings[:1]:
                        await throughput(backend, args, auth, separate, scheduling)
        if "watch" in parts:
            await watch(args, auth)
    finally:
        auth.stop()


if __name__ == "__main__":
    asyncio.run(main())
