"""Command line: ``credential-broker serve | keys generate|add|promote|rewrap|retire|status | config check``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from broker.config import BrokerConfig, check_listen_address, load_config, load_config_file
from broker.crypto import generate_keyring_file
from broker.crypto.keyfile import check_private_if_present
from broker.errors import BrokerError, ConfigError
from broker.logs import configure, fields

# The embedded default: a local SQLite file, a dev keyring generated on first start, and one
# example upstream, so `credential-broker serve` runs with no file at all. Not for production.
DEFAULT_CONFIG = """
listen: ["127.0.0.1:50051"]
store: {backend: sqlite, path: credential-broker-data/broker.db}
keyring: {file: credential-broker-data/dev-keyring.json}
upstreams:
  - name: example
    url: https://api.example.com
    auth_broker:
      mode: oauth_connect
      authorization_endpoint: https://auth.example.com/oauth/authorize
      token_endpoint: https://auth.example.com/oauth/token
      client_id: example-client
      token_endpoint_auth_method: none
      scopes: [read]
      redirect_uri: http://127.0.0.1:8080/callback
"""


def _load(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[BrokerConfig, bool]:
    if args.config is not None:
        return load_config_file(Path(args.config), environ=environ), False
    return load_config(yaml.safe_load(DEFAULT_CONFIG), environ=environ, base_dir=Path.cwd()), True


async def _serve(config: BrokerConfig, embedded: bool, *, reuse_port: bool = False) -> int:
    from broker.app import build_app  # grpc is imported only when serving

    log = configure(config.log.format, config.log.level)
    if embedded and not reuse_port:
        if not config.keyring.file.exists():
            generate_keyring_file(config.keyring.file)
            log.warning("generated a development keyring", extra=fields(path=str(config.keyring.file)))
        log.warning("running on the embedded development config; pass --config for real use")
    app = build_app(config, logger=log, reuse_port=reuse_port)
    await app.start()
    log.info(
        "serving",
        extra=fields(
            addresses=",".join(app.server.addresses), upstreams=len(config.upstreams), pid=os.getpid()
        ),
    )
    if app.metrics_address is not None:
        log.info("serving metrics", extra=fields(address=f"http://{app.metrics_address}/metrics"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: health is NOT_SERVING, finishing in-flight calls")
    await app.stop(grace=10.0)
    log.info("stopped")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="credential-broker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC sidecar")
    serve.add_argument("--config", help="YAML config file (default: the embedded development config)")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help="listen here instead (host:port or unix:///path; repeatable)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the TCP port (SO_REUSEPORT); default: config 'workers' or 1",
    )

    keys = commands.add_parser("keys", help="manage the keyring").add_subparsers(
        dest="keys_command", required=True
    )
    generate = keys.add_parser("generate", help="write a new keyring file (mode 0600)")
    generate.add_argument("--output", required=True, help="where to write it; never overwritten")
    for name, text in (
        ("add", "add a new non-primary key; prints its id"),
        ("promote", "make a key the primary (new records are wrapped under it)"),
        ("rewrap", "re-wrap every record's data key under the primary (payloads untouched)"),
        ("retire", "remove a key no record uses any more"),
        ("status", "records per key id"),
    ):
        sub = keys.add_parser(name, help=text)
        sub.add_argument("--config", help="YAML config file (its keyring.file and store.path)")
        if name in ("promote", "retire"):
            sub.add_argument("key_id", metavar="ID")
        if name == "rewrap":
            sub.add_argument("--batch-size", type=int, default=200)

    config = commands.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True
    )
    check = config.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", required=True)

    # Its arguments are parsed by broker.inject.webhook.main; listed here for --help.
    commands.add_parser("inject-webhook", help="run the Kubernetes sidecar-injection admission webhook")
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["inject-webhook"]:
        from broker.inject.webhook import main as webhook_main

        return webhook_main(argv[1:])
    args = _parser().parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        if args.command == "serve":
            config, embedded = _load(args, env)
            if args.listen:
                for address in args.listen:
                    check_listen_address(address)
                config = config.model_copy(update={"listen": tuple(args.listen)})
            if args.workers is not None:
                if not 1 <= args.workers <= 64:
                    raise ConfigError("--workers: must be between 1 and 64")
                config = config.model_copy(update={"workers": args.workers})
            if config.workers > 1:
                from broker.workers import serve_workers

                return serve_workers(config, embedded, _serve)
            return asyncio.run(_serve(config, embedded))
        if args.command == "keys" and args.keys_command == "generate":
            keyring = generate_keyring_file(Path(args.output))
            print(f"wrote keyring {args.output} with primary key {keyring.primary_id}")
            return 0
        if args.command == "keys" and args.keys_command != "generate":
            config, _ = _load(args, env)
            return _keys(args, config)
        if args.command == "config" and args.config_command == "check":
            config, _ = _load(args, env)
            check_private_if_present(config.keyring.file)
            print(
                f"config OK: {len(config.upstreams)} upstream(s), listening on {', '.join(entry.address for entry in config.listeners())}"
            )
            return 0
    except BrokerError as exc:
        print(f"credential-broker: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"credential-broker: --listen {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"credential-broker: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 2


def _keys(args: argparse.Namespace, config: BrokerConfig) -> int:
    from broker.crypto import FileKeySource
    from broker.keys import KeyRotation
    from broker.store import open_store

    store = open_store(config.store)
    try:
        rotation = KeyRotation(FileKeySource(config.keyring.file), store)
        command = args.keys_command
        if command == "add":
            print(rotation.add())  # the id alone, for scripts
        elif command == "promote":
            rotation.promote(args.key_id)
            print(f"key {args.key_id} is now the primary; run `keys rewrap` to move existing records")
        elif command == "rewrap":
            report = rotation.rewrap(args.batch_size)
            left = ", ".join(f"{kid}: {n}" for kid, n in sorted(report.remaining.items())) or "none"
            print(
                f"re-wrapped {report.rewrapped} record(s) under {report.primary} in {report.batches} "
                f"batch(es); {report.skipped} rewritten meanwhile, {report.failed} would not open; "
                f"left under other keys: {left}"
            )
            if report.failed:
                return 1
        elif command == "retire":
            rotation.retire(args.key_id)
            print(f"retired key {args.key_id}")
        elif command == "status":
            for kid, state, count in rotation.status():
                print(f"{kid}\t{state}\t{count}")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
