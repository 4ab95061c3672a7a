"""What the last-used stamp (broker/usage.py) costs Resolve: the same cached Resolve calls with
the stamp on, and with it replaced by a no-op, alternating in one process (ABBA rounds).

In-process (``BrokerService.resolve``, no gRPC), on a real SQLite store loaded with ``--users``
credentials. Each round is a new minute (a manual clock moves 61 s), so every credential is
due a stamp once per round, as under steady traffic (one is skipped when 16 stamp writes are
already pending, so the count printed may be lower); the loop yields to the event loop after each
call, as a server does between calls, so the stamp writes run alongside. Prints p50 and p99 of
each and the ratios on/off (target: p50 within 1.05x).

    python benchmarks/resolve_usage_stamp.py [--users 1000] [--calls 5000] [--rounds 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.seeding import bulk_load
from broker.app import build_app
from broker.clock import ManualClock
from broker.config import load_config
from broker.crypto import generate_keyring_file
from broker.logs import configure


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def run(users: int, calls: int, rounds: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="cb-stamp-"))
    try:
        generate_keyring_file(tmp / "keyring.json")
        document = {
            "store": {"path": str(tmp / "broker.db")},
            "keyring": {"file": str(tmp / "keyring.json")},
            "log": {"level": "error"},
            "audit": {"output": "none"},
            "background_refresh": {"enabled": False},
            "upstreams": [
                {
                    "name": "bench",
                    "url": "https://api.bench.test",
                    "auth_broker": {
                        "mode": "oauth_connect",
                        "authorization_endpoint": "https://as.bench.test/authorize",
                        "token_endpoint": "https://as.bench.test/token",
                        "client_id": "bench",
                        "token_endpoint_auth_method": "none",
                        "redirect_uri": "https://app.bench.test/cb",
                    },
                }
            ],
        }
        configure("text", "error")
        clock = ManualClock(time.time())
        app = build_app(load_config(document, environ={}, base_dir=tmp), clock=clock)
        try:
            bulk_load(app.store, app.vault, app.config.upstreams[0].key, users)
            service = app.service
            stamp = service.usage.used
            seen: dict[str, list[float]] = {"on": [], "off": []}
            for index in range(rounds):
                mode = "on" if index % 4 in (0, 3) else "off"
                service.usage.used = stamp if mode == "on" else (lambda *_: None)  # type: ignore[method-assign]
                clock.advance(61)  # a new minute: every credential is due a stamp again
                for call in range(calls):
                    started = time.perf_counter()
                    await service.resolve(f"user-{call % users}", "bench", "", 0)
                    seen[mode].append(time.perf_counter() - started)
                    await asyncio.sleep(0)
                await service.usage.drain()
            out = {
                f"{mode}_{name}_us": _percentile(values, q) * 1e6
                for mode, values in seen.items()
                for name, q in (("p50", 0.5), ("p99", 0.99))
            }
            out["p50_x"] = out["on_p50_us"] / out["off_p50_us"]
            out["p99_x"] = out["on_p99_us"] / out["off_p99_us"]
            out["stamps_written"] = float(service.usage.written)
            return out
        finally:
            app.store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=5000, help="Resolve calls per round")
    parser.add_argument("--rounds", type=int, default=12, help="ABBA rounds (a multiple of 4)")
    args = parser.parse_args()
    result = asyncio.run(run(args.users, args.calls, args.rounds))
    print(
        f"stamp on:  p50 {result['on_p50_us']:.1f} us  p99 {result['on_p99_us']:.1f} us\n"
        f"stamp off: p50 {result['off_p50_us']:.1f} us  p99 {result['off_p99_us']:.1f} us\n"
        f"ratio on/off: p50 {result['p50_x']:.2f}x  p99 {result['p99_x']:.2f}x "
        f"({int(result['stamps_written'])} stamps written)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
