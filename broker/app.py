"""Composition: config -> keyring, store, vault, token client, service, server."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import httpx

from broker.clock import Clock, SystemClock
from broker.config import BrokerConfig
from broker.crypto import EnvelopeCipher, FileKeySource, KeySource
from broker.errors import KeyringError
from broker.logs import get_logger
from broker.oauth.client import TokenEndpointClient
from broker.rpc.server import BrokerServer
from broker.rpc.servicer import CredentialBrokerServicer
from broker.service import BrokerService
from broker.store import CredentialStore, open_store
from broker.vault import CredentialVault


@dataclass
class App:
    """A wired broker: start it, then stop it."""

    config: BrokerConfig
    store: CredentialStore
    vault: CredentialVault
    tokens: TokenEndpointClient
    service: BrokerService
    server: BrokerServer

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        await self.tokens.aclose()
        self.store.close()


def build_app(
    config: BrokerConfig,
    *,
    clock: Clock | None = None,
    key_source: KeySource | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    logger: logging.Logger | None = None,
    reuse_port: bool = False,
) -> App:
    """Build every part from the config. Raises KeyringError, StoreError or OSError."""
    logger = logger or get_logger()
    keyring = (key_source or FileKeySource(config.keyring.file)).load()
    cipher = EnvelopeCipher(keyring)
    store = open_store(config.store)
    try:
        vault = CredentialVault(store, cipher)
        problem = vault.check_keyring_opens_store(keyring.ids())
        if problem is not None:
            where = config.store.path if config.store.backend == "sqlite" else "postgres"
            raise KeyringError(f"{problem} (keyring: {config.keyring.file}, store: {where})")
        tokens = TokenEndpointClient(
            timeout=config.http.timeout_seconds,
            max_bytes=config.http.max_response_bytes,
            transport=transport,
        )
        service = BrokerService(config, vault, tokens, clock or SystemClock(), logger)
        server = BrokerServer(
            CredentialBrokerServicer(service, logger),
            config.listen,
            health_listen=config.health_listen,
            extra_handlers=extra_handlers,
            reuse_port=reuse_port,
        )
    except BaseException:
        store.close()
        raise
    return App(config, store, vault, tokens, service, server)
