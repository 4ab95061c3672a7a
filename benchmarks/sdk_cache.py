"""The Python SDK's cache: a cached ``resolve`` against an uncached one (one RPC), and staleness.

    python benchmarks/sdk_cache.py [--backend sqlite|postgres|both] [--resolves N] [--samples N]

Starts the loopback authorization server (tests/authserver.py) and two ``broker serve``
processes, replicas A and B, on one store (a SQLite file, or a fresh PostgreSQL schema on
$CREDENTIAL_BROKER_TEST_PG_DSN / --dsn). Users connect through real flows.

- latency: p50 (µs) of ``BrokerClient(A).resolve`` without the cache (one RPC each) and with
  ``cache=True`` (hits), in this process, same run; the ratio (target >= 100x).
- staleness: a client with ``cache=True`` on A holds each user's token; a plain client calls
  Refresh or Disconnect on B (the other replica). The time from sending that RPC (an upper
  bound on its commit) until A's client's cache no longer serves the old token, p50 and p99
  (target p99 < 250 ms). The broker's own read cache (``read_cache_seconds``) is another layer
  and not part of this figure.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from credential_broker_client import BrokerClient

from broker.crypto import generate_keyring_file
from tests.authserver import AuthServer
from tests.brokerproc import write_config
from tests.conftest import REDIRECT_URI, UPSTREAM, upstream_doc
from tests.sdk.conftest import PatientServerProcess


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def connect(client: BrokerClient, auth: AuthServer, user: str) -> None:
    started = client.build_authorization_url(user, UPSTREAM)
    callback = auth.authorize(started.authorization_url, user)
    client.complete(callback["state"], callback["code"], user)


@contextlib.contextmanager
def replicas(backend: str, dsn: str | None, tmp: Path, auth: AuthServer) -> Iterator[tuple[str, str]]:
    client = auth.new_client(redirect_uri=REDIRECT_URI)
    generate_keyring_file(tmp / "keyring.json")
    with contextlib.ExitStack() as stack:
        store: dict[str, object] = {"path": str(tmp / "data" / "broker.db")}
        if backend == "postgres":
            from benchmarks.seeding import postgres_dsn

            store = {"backend": "postgres", "dsn": stack.enter_context(postgres_dsn(dsn))}
        document = {
            "store": store,
            "keyring": {"file": str(tmp / "keyring.json")},
            "upstreams": [upstream_doc(auth, client)],
            "background_refresh": {"enabled": False},
            "audit": {"output": "none"},
        }
        servers = []
        for name in "ab":
            servers.append(
                PatientServerProcess(write_config(document, tmp / f"{name}.yaml"), tmp / f"{name}.log")
            )
            stack.callback(servers[-1].stop)
        yield servers[0].address, servers[1].address


def latency(target: str, resolves: int) -> tuple[float, float]:
    """p50 seconds of an uncached and a cached resolve of one connected user, paired rounds."""
    with BrokerClient(target) as plain, BrokerClient(target, cache=True) as cached:
        assert cached.wait_cache_live(), "the cache's watch stream did not come up"
        for _ in range(50):  # warm up both paths (and fill the cache)
            plain.resolve("bench-0", UPSTREAM)
            cached.resolve("bench-0", UPSTREAM)
        rpc: list[float] = []
        hit: list[float] = []
        for round_ in range(4):
            for name in ("rpc", "hit") if round_ % 2 == 0 else ("hit", "rpc"):
                client, into, count = (
                    (plain, rpc, resolves // 4) if name == "rpc" else (cached, hit, resolves * 5)
                )
                for _ in range(count):
                    start = time.perf_counter()
                    client.resolve("bench-0", UPSTREAM)
                    into.append(time.perf_counter() - start)
        assert cached.cache is not None and cached.cache.hits >= len(hit), "the cached path made RPCs"
        return statistics.median(rpc), statistics.median(hit)


def staleness(target_a: str, target_b: str, users: list[str]) -> dict[str, list[float]]:
    """Seconds until A's client's cache drops the token, from a Refresh / Disconnect sent to B
    (``refresh``, ``disconnect``: an upper bound, the RPC included) and from its answer
    (``*_after_answer``: a lower bound; the commit lies between the two)."""
    out: dict[str, list[float]] = {
        "refresh": [],
        "disconnect": [],
        "refresh_after_answer": [],
        "disconnect_after_answer": [],
    }
    with BrokerClient(target_a, cache=True) as watcher, BrokerClient(target_b) as other:
        assert watcher.wait_cache_live(), "the cache's watch stream did not come up"
        cache = watcher.cache
        assert cache is not None
        for n, user in enumerate(users):
            kind = "refresh" if n % 2 == 0 else "disconnect"
            deadline = time.monotonic() + 5
            while cache.get((user, UPSTREAM), 0, ()) is None:  # cached (past any earlier event)
                watcher.resolve(user, UPSTREAM)
                if time.monotonic() > deadline:
                    raise SystemExit(f"{user} never got cached")
                time.sleep(0.01)
            start = time.perf_counter()
            if kind == "refresh":
                other.refresh(user, UPSTREAM)
            else:
                other.disconnect(user, UPSTREAM)
            answered = time.perf_counter()
            while cache.get((user, UPSTREAM), 0, ()) is not None:
                if time.perf_counter() - start > 10:
                    raise SystemExit(f"the {kind} of {user} was never honoured by the cache")
                time.sleep(0.0005)
            dropped = time.perf_counter()
            out[kind].append(dropped - start)
            out[f"{kind}_after_answer"].append(dropped - answered)
    return out


def run(backend: str, dsn: str | None, resolves: int, samples: int) -> None:
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="cb-sdk-bench-"))
        auth = stack.enter_context(AuthServer())
        a, b = stack.enter_context(replicas(backend, dsn, Path(folder), auth))
        users = [f"bench-{n}" for n in range(samples + 1)]
        with BrokerClient(b) as setup:
            for user in users:
                connect(setup, auth, user)
        time.sleep(0.5)  # past the CONNECTED events' settle window
        rpc, hit = latency(a, resolves)
        print(
            f"{backend} latency: uncached resolve p50 {rpc * 1e6:.1f} us, cached p50 {hit * 1e6:.2f} us, "
            f"ratio {rpc / hit:.0f}x (target >= 100x)"
        )
        stale = staleness(a, b, users[1:])
        for kind, values in stale.items():
            print(
                f"{backend} staleness {kind} on the other replica: n={len(values)} "
                f"p50 {pct(values, 0.5) * 1e3:.1f} ms p99 {pct(values, 0.99) * 1e3:.1f} ms (target p99 < 250 ms)"
            )
        both = stale["refresh"] + stale["disconnect"]
        print(f"{backend} staleness all: p99 {pct(both, 0.99) * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--dsn", help="PostgreSQL server DSN (default $CREDENTIAL_BROKER_TEST_PG_DSN)")
    parser.add_argument("--resolves", type=int, default=4000, help="uncached resolves per run")
    parser.add_argument("--samples", type=int, default=200, help="staleness samples per backend")
    args = parser.parse_args()
    for backend in ("sqlite", "postgres") if args.backend == "both" else (args.backend,):
        run(backend, args.dsn, args.resolves, args.samples)


if __name__ == "__main__":
    main()
