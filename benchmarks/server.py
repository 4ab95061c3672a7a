"""Benchmark server: the real broker plus an empty RPC on the same grpc server and listeners.

Run by benchmarks/resolve_vs_empty.py in a subprocess; prints one JSON line with its addresses
once serving. ``--users N`` bulk-loads N connected users with long-lived credentials straight
into the store; ``--backend postgres --dsn DSN`` uses PostgreSQL (the DSN's schema must be
empty or hold a broker schema); ``--token-endpoint URL`` points the upstream at a real
authorization server (for the coalescing benchmark); ``--tracing-endpoint URL`` turns tracing on,
exporting every span to that OTLP/gRPC collector (for the tracing cost benchmark);
``--event-loop asyncio`` runs on the standard library's loop instead of the default uvloop.

Besides Empty, ``/bench.Bench/Answer`` returns the bytes of user-0's ResolveResponse (resolved
once, at its first call) from a bare handler: what a Resolve would cost gRPC with none of the
broker's own Python work (the floor benchmarks/resolve_vs_check.py --floor measures against the
health Check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.seeding import bulk_load
from broker import event_loop
from broker.app import build_app
from broker.config import load_config
from broker.crypto import generate_keyring_file
from broker.logs import configure
from broker.rpc.servicer import resolve_response

EMPTY_METHOD = "/bench.Bench/Empty"


def _bench_handler(resolve: Callable[[], Awaitable[bytes]]) -> grpc.GenericRpcHandler:
    """Empty returns nothing; Answer returns what ``resolve()`` gave at its first call."""

    answer: list[bytes] = []

    async def empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    async def constant(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if not answer:
            answer.append(await resolve())
        return answer[0]

    def raw(method: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=None, response_serializer=None
        )

    return grpc.method_handlers_generic_handler("bench.Bench", {"Empty": raw(empty), "Answer": raw(constant)})


async def _resolve_answer(app: Any) -> bytes:
    """user-0's ResolveResponse as the servicer builds it, serialized."""
    return resolve_response(await app.service.resolve("user-0", "bench", "", 0)).SerializeToString()


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--dsn", help="PostgreSQL DSN (backend postgres)")
    parser.add_argument("--dir", help="folder for the keyring and SQLite file (default: a new temp dir)")
    parser.add_argument("--tracing-endpoint", help="trace every RPC, exporting to this OTLP/gRPC collector")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cb-bench-"))
    if not (tmp / "keyring.json").exists():
        generate_keyring_file(tmp / "keyring.json")
    store: dict[str, object] = {"path": str(tmp / "broker.db")}
    if args.backend == "postgres":
        store = {"backend": "postgres", "dsn": args.dsn, "pool_size": 8}
    document = {
        "listen": ["127.0.0.1:0", f"unix://{tmp}/broker.sock"],
        "store": store,
        "keyring": {"file": str(tmp / "keyring.json")},
        "log": {"level": "error"},
        "event_loop": args.event_loop,
        # Every Resolve writes an audit event, as in production; to a file so stdout stays quiet.
        "audit": {"output": "file", "path": str(tmp / "audit.jsonl")},
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
    if args.tracing_endpoint:
        document["tracing"] = {"enabled": True, "endpoint": args.tracing_endpoint, "sample_ratio": 1.0}
    config = load_config(document, environ={}, base_dir=tmp)
    configure("text", "error")
    app = build_app(config, extra_handlers=[_bench_handler(lambda: _resolve_answer(app))])
    key = config.upstreams[0].key
    loaded = 0.0
    if args.users and app.store.get_credential("user-0", key) is None:
        loaded = bulk_load(app.store, app.vault, key, args.users)
    await app.start()
    print(
        json.dumps({"tcp": app.server.addresses[0], "unix": app.server.addresses[1], "load_seconds": loaded}),
        flush=True,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await app.stop(grace=1)
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    arguments = _args()
    sys.exit(event_loop.run(main(arguments), arguments.event_loop))
