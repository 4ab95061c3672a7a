"""Command line: ``credential-broker serve | keys generate|add|promote|rewrap|retire|status|wrap|unwrap|
rewrap-root | config check | providers list|show``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from broker import event_loop
from broker.config import (
    BrokerConfig,
    check_listen_address,
    check_listener_security,
    load_config,
    load_config_file,
)
from broker.config_errors import format_errors
from broker.crypto import generate_keyring_file
from broker.errors import BrokerError, ConfigError, StoreError
from broker.logs import configure, fields
from broker.preflight import file_problems, listener_problems, not_checked

# The top-level --help text (plain words: argparse prints it as it is).
DESCRIPTION = """\
A gRPC sidecar that obtains, encrypts, stores, refreshes and hands out per-user
OAuth credentials.

  try it:        credential-broker serve   (an embedded development config)
  for real use:  credential-broker keys generate --output KEYRING
                 credential-broker config check --config FILE
                 credential-broker serve --config FILE
"""

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
    if not reuse_port:
        # Before any file is made (dev keyring, store): a taken port or a live socket stops here.
        _refuse([*listener_problems(config), *file_problems(config)])
    if embedded and not reuse_port:
        if not config.keyring.file.exists():
            generate_keyring_file(config.keyring.file)
            log.warning("generated a development keyring", extra=fields(path=str(config.keyring.file)))
        log.warning("running on the embedded development config; pass --config for real use")
    app = build_app(config, logger=log, reuse_port=reuse_port)
    # Handlers first: a SIGTERM right after the "serving" line must stop gracefully.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    log.info(
        "serving",
        extra=fields(
            addresses=",".join(app.server.addresses), upstreams=len(config.upstreams), pid=os.getpid()
        ),
    )
    if app.metrics_address is not None:
        log.info("serving metrics", extra=fields(address=f"http://{app.metrics_address}/metrics"))
    await stop.wait()
    log.info("stopping: health is NOT_SERVING, finishing in-flight calls")
    await app.stop(grace=10.0)
    log.info("stopped")
    return 0


def _refuse(problems: Sequence[str]) -> None:
    if problems:
        raise ConfigError(format_errors(problems))


def _version() -> str:
    try:
        return version("credential-broker")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credential-broker",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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

    keys = commands.add_parser(
        "keys", help="create and rotate the keyring (keys COMMAND --help)"
    ).add_subparsers(dest="keys_command", required=True)
    generate = keys.add_parser("generate", help="write a new keyring file (mode 0600)")
    generate.add_argument("--output", required=True, help="where to write it; never overwritten")
    for name, text in (
        ("add", "add a new non-primary key; prints its id"),
        ("promote", "make a key the primary (new records are wrapped under it)"),
        ("rewrap", "re-wrap every record's data key under the primary (payloads untouched)"),
        ("retire", "remove a key no record uses any more"),
        ("status", "records per key id"),
        ("wrap", "wrap every key of a plain keyring with keyring.wrapped_by's root key (KMS, HSM)"),
        ("unwrap", "turn a wrapped keyring back into a plain one (for leaving a KMS)"),
        ("rewrap-root", "re-wrap every key under the root key's current version, after a rotation"),
    ):
        sub = keys.add_parser(name, help=text)
        # Required: a key command on the embedded development config would act on files in the
        # current folder, which is never what an operator rotating keys means.
        sub.add_argument(
            "--config",
            required=True,
            help="YAML config file: the keyring.file to change and the store (which must exist)",
        )
        if name == "promote":
            sub.add_argument("key_id", metavar="ID", help="the key id to make the primary (see keys status)")
        if name == "retire":
            sub.add_argument("key_id", metavar="ID", help="the key id to remove (see keys status)")
        if name == "rewrap":
            sub.add_argument(
                "--batch-size",
                type=int,
                default=200,
                metavar="N",
                help="records re-wrapped per store transaction (default: 200)",
            )

    config = commands.add_parser("config", help="check a config file (config check --help)").add_subparsers(
        dest="config_command", required=True
    )
    check = config.add_parser(
        "check",
        help="validate a config file, open its keyring and try its addresses, without serving",
    )
    check.add_argument("--config", required=True, help="the YAML config file to check")

    providers = commands.add_parser(
        "providers", help="the provider presets for `provider: NAME` (providers COMMAND --help)"
    ).add_subparsers(dest="providers_command", required=True)
    listing = providers.add_parser("list", help="every provider preset, by name")
    show = providers.add_parser("show", help="what one preset sets, its documentation and setup")
    show.add_argument("name", metavar="NAME", help="the provider's name (see providers list)")
    for sub in (listing, show):
        sub.add_argument(
            "--providers-file",
            metavar="PATH",
            help="also read this providers_file (its entries add to or replace the built-in ones)",
        )

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
                check_listener_security(config)
            if args.workers is not None:
                if not 1 <= args.workers <= 64:
                    raise ConfigError("--workers: must be between 1 and 64")
                config = config.model_copy(update={"workers": args.workers})
            if config.workers > 1:
                from broker.workers import serve_workers

                _refuse(listener_problems(config))
                return serve_workers(config, embedded, _serve)
            return event_loop.run(_serve(config, embedded), config.event_loop)
        if args.command == "keys" and args.keys_command == "generate":
            keyring = generate_keyring_file(Path(args.output))
            print(f"wrote keyring {args.output} with primary key {keyring.primary_id}")
            return 0
        if args.command == "keys" and args.keys_command != "generate":
            config, _ = _load(args, env)
            return _keys(args, config, env)
        if args.command == "providers":
            return _providers(args)
        if args.command == "config" and args.config_command == "check":
            config, _ = _load(args, env)
            return _check(config, env)
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


def _providers(args: argparse.Namespace) -> int:
    from broker.config import provider_catalogue
    from broker.providers import describe

    extra = Path(args.providers_file) if args.providers_file else None
    catalogue = provider_catalogue(extra)
    if args.providers_command == "list":
        print(describe.list_text(catalogue))
    else:
        print(describe.show_text(catalogue, args.name))
    return 0


def _check(config: BrokerConfig, environ: Mapping[str, str]) -> int:
    """``config check``: what can be known without serving; says what it could not check."""
    from broker.crypto.keysource import key_source_for

    keyring = key_source_for(config.keyring, environ).load()
    _refuse([*listener_problems(config), *file_problems(config)])
    listening = ", ".join(entry.address for entry in config.listeners())
    print(f"config OK: {len(config.upstreams)} upstream(s), listening on {listening}")
    count = len(keyring.ids())
    print(
        f"checked: the keyring {config.keyring.file} opens ({count} key{'s' if count != 1 else ''}); "
        "every address can be bound; every socket folder can be used"
    )
    for line in not_checked(config):
        print(f"not checked: {line}")
    return 0


def _keys(args: argparse.Namespace, config: BrokerConfig, environ: Mapping[str, str]) -> int:
    from broker.crypto.keysource import key_source_for
    from broker.keys import KeyRotation
    from broker.store import open_store

    if args.keys_command in ("wrap", "unwrap", "rewrap-root"):
        return _custody(args.keys_command, config, environ)
    # Check the inputs before opening the store, and never create a store here: a failed
    # command leaves no file behind.
    source = key_source_for(config.keyring, environ)
    source.load()
    if config.store.backend == "sqlite" and not config.store.path.exists():
        raise StoreError(
            f"no store at {config.store.path}; keys commands work on an existing store: start the "
            "broker once (serve creates it), or check store.path"
        )
    store = open_store(config.store)
    try:
        rotation = KeyRotation(source, store)
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


def _custody(command: str, config: BrokerConfig, environ: Mapping[str, str]) -> int:
    """``keys wrap | unwrap | rewrap-root``: the keyring file converted in place, atomically.
    Records are never touched: their data keys stay wrapped by the same KEKs."""
    from broker.crypto.keysource import wrapped_source_for
    from broker.crypto.wrapped import rewrap_root, unwrap_keyring, wrap_keyring

    target = wrapped_source_for(config.keyring, environ)
    where = f"the keyring {config.keyring.file}"
    if command == "wrap":
        count = len(wrap_keyring(target).ids())
        print(f"wrapped {count} key(s) of {where} with the root key ({target.root.describe()})")
    elif command == "unwrap":
        count = len(unwrap_keyring(target).ids())
        print(f"unwrapped {count} key(s): {where} is a plain keyring again; remove keyring.wrapped_by")
    else:
        count = rewrap_root(target)
        print(f"re-wrapped {count} key(s) of {where} under the root key ({target.root.describe()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
