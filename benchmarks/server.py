"""Benchmark server: the real broker plus an empty RPC on the same grpc server and listeners.

Run by benchmarks/resolve_vs_empty.py in a subprocess; prints one JSON line with its addresses
once serving. ``--users N`` seeds N connected users with long-lived credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc

from broker.app import build_app
from broker.config import load_config
from broker.crypto import generate_keyring_file
from broker.logs import configure
from broker.models import Credential, Secrets

EMPTY_METHOD = "/bench.Bench/Empty"


def _empty_handler() -> grpc.GenericRpcHandler:
    async def empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    handler = grpc.unary_unary_rpc_method_handler(empty, request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler("bench.Bench", {"Empty": handler})


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cb-bench-"))
    generate_keyring_file(tmp / "keyring.json")
    document = {
        "listen": ["127.0.0.1:0", f"unix://{tmp}/broker.sock"],
        "store": {"path": str(tmp / "broker.db")},
        "keyring": {"file": str(tmp / "keyring.json")},
        "log": {"level": "error"},
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
    config = load_config(document, environ={}, base_dir=tmp)
    configure("text", "error")
    app = build_app(config, extra_handlers=[_empty_handler()])
    key = config.upstreams[0].key
    now = time.time()
    for i in range(args.users):
        credential = Credential(
            f"user-{i}",
            key,
            Secrets(f"access-{i}", f"refresh-{i}"),
            "Bearer",
            ("read",),
            now + 86400,
            "connect_flow",
            now,
        )
        app.vault.save(credential, None, now)
    await app.start()
    print(json.dumps({"tcp": app.server.addresses[0], "unix": app.server.addresses[1]}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await app.stop(grace=1)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
