"""Minimal CredentialBroker client, built on the Python SDK (clients/python).

    python client.py resolve --user U --upstream NAME [--target T]

The target comes from --target, else $CREDENTIAL_BROKER_SOCKET
(e.g. unix:///run/credential-broker/broker.sock), else 127.0.0.1:50051.
The SDK sends the request header, reads the ErrorInfo and retries UNAVAILABLE
within the call's deadline.

Exit codes: 0 credential printed, 3 user not connected, 1 any other error,
2 usage error. The access token itself is never printed.
"""

from __future__ import annotations

import argparse
import sys

from credential_broker_client import BrokerClient, BrokerError, NotConnected

TIMEOUT_SECONDS = 5.0


def resolve(args: argparse.Namespace) -> int:
    with BrokerClient(args.target, timeout=TIMEOUT_SECONDS) as broker:
        try:
            credential = broker.resolve(args.user, args.upstream)
        except NotConnected as exc:
            print(f"NOT_CONNECTED {exc.authorization_url}")
            return 3
        except BrokerError as exc:
            print(exc.code.name)
            print(exc.message, file=sys.stderr)
            return 1
    expires = "none"
    if credential.expires_at is not None:
        expires = credential.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    print(
        f"OK {credential.header_name} {credential.token_type} {expires} token_len={len(credential.access_token)}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="client.py", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    res = sub.add_parser("resolve", help="print the header for (user, upstream)")
    res.add_argument("--user", required=True)
    res.add_argument("--upstream", required=True)
    res.add_argument(
        "--target",
        default=None,
        help="broker address (default: $CREDENTIAL_BROKER_SOCKET or 127.0.0.1:50051)",
    )
    return resolve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
