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
from broker.exchange import TokenExchanger
from broker.identity import IdentityVerifier, UserAuthenticator
from broker.logs import get_logger
from broker.oauth.client import TokenEndpointClient
from broker.policy import PolicyEnforcer, build_policy
from broker.rpc.server import BrokerServer
from broker.rpc.servicer import CredentialBrokerServicer
from broker.service import BrokerService
from broker.store import SqliteStore
from broker.vault import CredentialVault


@dataclass
class App:
    """A wired broker: start it, then stop it."""

    config: BrokerConfig
    store: SqliteStore
    vault: CredentialVault
    tokens: TokenEndpointClient
    service: BrokerService
    server: BrokerServer
    exchanger: TokenExchanger | None = None
    identity: IdentityVerifier | None = None

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        await self.tokens.aclose()
        if self.identity is not None:
            await self.identity.aclose()
        self.store.close()


def build_app(
    config: BrokerConfig,
    *,
    clock: Clock | None = None,
    key_source: KeySource | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    logger: logging.Logger | None = None,
) -> App:
    """Build every part from the config. Raises KeyringError, StoreError or OSError."""
    logger = logger or get_logger()
    keyring = (key_source or FileKeySource(config.keyring.file)).load()
    cipher = EnvelopeCipher(keyring)
    store = SqliteStore(config.store.path)
    try:
        vault = CredentialVault(store, cipher)
        problem = vault.check_keyring_opens_store(keyring.ids())
        if problem is not None:
            raise KeyringError(f"{problem} (keyring: {config.keyring.file}, store: {config.store.path})")
        tokens = TokenEndpointClient(
            timeout=config.http.timeout_seconds,
            max_bytes=config.http.max_response_bytes,
            transport=transport,
        )
        clock = clock or SystemClock()
        exchanger = TokenExchanger(vault, tokens, clock, logger)
        policy = PolicyEnforcer(build_policy(config.policy), logger)
        service = BrokerService(config, vault, tokens, clock, logger, exchanger, policy)
        identity = None
        if config.identity is not None:
            identity = IdentityVerifier(
                config.identity,
                clock,
                timeout=config.http.timeout_seconds,
                transport=transport,
                logger=logger,
            )
        server = BrokerServer(
            CredentialBrokerServicer(service, logger, UserAuthenticator(identity)),
            config.listen,
            health_listen=config.health_listen,
            extra_handlers=extra_handlers,
        )
    except BaseException:
        store.close()
        raise
    return App(config, store, vault, tokens, service, server, exchanger, identity)
