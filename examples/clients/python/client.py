"""Minimal CredentialBroker client.

    python client.py resolve --user U --upstream NAME [--target T]

The target comes from --target, else $CREDENTIAL_BROKER_SOCKET
(e.g. unix:///run/credential-broker/broker.sock), else 127.0.0.1:50051.
The stubs are generated from the repository's proto with grpcio-tools into a
temporary directory on every run, so they never go stale.

Exit codes: 0 credential printed, 3 user not connected, 1 any other gRPC error,
2 usage error. The access token itself is never printed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

DEFAULT_TARGET = "127.0.0.1:50051"
PROTO_ROOT = Path(
    os.environ.get("CREDENTIAL_BROKER_PROTO_ROOT", Path(__file__).resolve().parents[3] / "proto")
)


def generate_stubs(out: Path) -> tuple[ModuleType, ModuleType]:
    """Generate broker_pb2 / broker_pb2_grpc into out and import them."""
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "credentialbroker/v1/broker.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_ROOT}")
    sys.path.insert(0, str(out))
    return (
        importlib.import_module("credentialbroker.v1.broker_pb2"),
        importlib.import_module("credentialbroker.v1.broker_pb2_grpc"),
    )


def not_connected_url(err: grpc.RpcError) -> str | None:
    """The authorization URL of a NOT_CONNECTED ErrorInfo in the call's status details."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if not detail.Unpack(info):
            continue
        if info.domain == "credentialbroker" and info.reason == "NOT_CONNECTED":
            return info.metadata.get("authorization_url", "")
    return None


def resolve(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        pb2, pb2_grpc = generate_stubs(Path(tmp))
    with grpc.insecure_channel(args.target) as channel:
        stub = pb2_grpc.CredentialBrokerStub(channel)
        try:
            resp = stub.Resolve(
                pb2.ResolveRequest(user_id=args.user, upstream=args.upstream),
                # The broker's SSRF guard requires this header from TCP callers; send it always.
                metadata=[("x-credential-broker-request", "true")],
                timeout=10,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                url = not_connected_url(err)
                if url is not None:
                    print(f"NOT_CONNECTED {url}")
                    return 3
            print(err.code().name)
            print(err.details(), file=sys.stderr)
            return 1
    expires = "none"
    if resp.HasField("expires_at"):
        when = datetime.fromtimestamp(resp.expires_at.seconds, UTC)
        expires = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"OK {resp.header_name} {resp.token_type} {expires} token_len={len(resp.access_token)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="client.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    res = sub.add_parser("resolve", help="print the header for (user, upstream)")
    res.add_argument("--user", required=True)
    res.add_argument("--upstream", required=True)
    res.add_argument(
        "--target",
        default=os.environ.get("CREDENTIAL_BROKER_SOCKET") or DEFAULT_TARGET,
        help="broker address (default: $CREDENTIAL_BROKER_SOCKET or %(default)s)",
    )
    return resolve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
