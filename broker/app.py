"""Composition: config -> keyring, store, vault, token client, service, server."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
import httpx

from broker.audit import Auditor, AuditSink, sink_from_config
from broker.callers import CallerPolicy
from broker.clock import Clock, SystemClock
from broker.config import BrokerConfig
from broker.connect.flows import HostedConnect
from broker.connect.server import ConnectServer
from broker.connections import ConnectionManager
from broker.crypto import EnvelopeCipher, KeySource
from broker.crypto.keyring import Keyring
from broker.crypto.keysource import key_source_for
from broker.crypto.sources.base import RootKey
from broker.crypto.wrapped import WrappedKeyringFile
from broker.errors import ConfigError
from broker.events import EVENT_FALLBACK_POLL_SECONDS, EVENT_POLL_SECONDS, EventHub
from broker.exchange import TokenExchanger
from broker.flow_purge import FlowPurger
from broker.identity import IdentityVerifier, UserAuthenticator
from broker.key_checks import StoreKeyCheck
from broker.keys import KeyringFollower
from broker.logs import get_logger
from broker.metrics import BrokerMetrics, MeteredTokenClient, timed_store
from broker.oauth.client import TokenEndpointClient
from broker.oauth.client_auth import load_client_keys
from broker.oauth.rfc7009 import RevocationClient
from broker.oauth.rfc8414 import MetadataCache, apply_discovery
from broker.oauth.tls import outbound_ssl_context
from broker.offboarding import Offboarding
from broker.policy import PolicyEnforcer, build_policy
from broker.preflight import describe_bind_error
from broker.refresh_process import RefresherProcess
from broker.refresher import BackgroundRefresher
from broker.retention import Reaper
from broker.rpc.interceptors import CallerInterceptor
from broker.rpc.server import SERVICE_NAME, BrokerServer
from broker.rpc.servicer import CredentialBrokerServicer
from broker.service import BrokerService
from broker.store import CredentialStore, open_store
from broker.tracing import NO_SPANS, Spans, start_tracing
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
    exchanger: TokenExchanger | None = None
    identity: IdentityVerifier | None = None
    auditor: Auditor | None = None
    metrics: BrokerMetrics | None = None
    connections: ConnectionManager | None = None
    #: The bound metrics address once started (None when metrics are off).
    metrics_address: str | None = None
    flow_purger: FlowPurger | None = None
    #: In this process, or in a child process (``background_refresh.separate_process``).
    refresher: BackgroundRefresher | RefresherProcess | None = None
    events: EventHub | None = None
    tracing: Spans = NO_SPANS
    reaper: Reaper | None = None
    #: The hosted connect listener (broker/connect/), when ``connect`` is configured.
    connect_server: ConnectServer | None = None

    async def start(self) -> None:
        if self.events is not None:
            await self.events.start()
        await self.server.start()
        if self.metrics is not None and self.config.metrics.listen is not None:
            try:
                self.metrics_address = self.metrics.serve(self.config.metrics.listen)
            except OSError as exc:
                await self.server.stop(0)
                reason = describe_bind_error(self.config.metrics.listen, exc)
                raise ConfigError(f"metrics.listen: {reason}") from None
        if self.connect_server is not None:
            try:
                await self.connect_server.start()
            except ConfigError:
                await self.server.stop(0)
                if self.events is not None:
                    await self.events.stop()
                if self.metrics is not None:
                    self.metrics.stop()
                raise
        if self.flow_purger is not None:
            self.flow_purger.start()
        if self.refresher is not None:
            self.refresher.start()
        if self.reaper is not None:
            self.reaper.start()

    async def stop(self, grace: float = 5.0) -> None:
        if self.connect_server is not None:
            await self.connect_server.stop()
        await self.server.stop(grace)
        if self.refresher is not None:
            await self.refresher.stop()
        if self.events is not None:
            await self.events.stop()
        if self.flow_purger is not None:
            await self.flow_purger.stop()
        if self.reaper is not None:
            await self.reaper.stop()
        if self.metrics is not None:
            self.metrics.stop()
        await self.service.usage.drain()
        await self.tokens.aclose()
        if self.identity is not None:
            await self.identity.aclose()
        self.store.close()
        await self.tracing.shutdown()


@dataclass
class Core:
    """What serving and the background refresh process (broker/refresh_worker.py) both need: the
    store, the vault, the token client and the service, with their metrics, audit and tracing."""

    config: BrokerConfig
    spans: Spans
    metrics: BrokerMetrics
    auditor: Auditor
    source: KeySource
    keyring: Keyring
    store: CredentialStore
    #: ``store`` as seen through tracing (store spans inside traced calls)
    traced: CredentialStore
    vault: CredentialVault
    tokens: MeteredTokenClient
    exchanger: TokenExchanger
    service: BrokerService
    #: the one SSL context of every outbound HTTPS client (http.ca_file; broker/oauth/tls.py)
    outbound_tls: ssl.SSLContext


def build_core(
    config: BrokerConfig,
    *,
    clock: Clock,
    logger: logging.Logger,
    key_source: KeySource | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    audit_sinks: Sequence[AuditSink] | None = None,
    discover: bool = True,
) -> Core:
    """Build the shared parts from the config. Raises ConfigError, KeyringError, StoreError or
    OSError; nothing is left open when it raises.

    Upstreams that name an ``issuer`` get their missing endpoints from its RFC 8414 metadata
    here, once (unless ``discover`` is off: a config that already went through it)."""
    spans = start_tracing(config.tracing, store_system=config.store.backend)
    outbound_tls = outbound_ssl_context(config.http.ca_file)
    if discover and any(u.auth_broker.issuer for u in config.upstreams):
        config = apply_discovery(
            config,
            MetadataCache(timeout=config.http.timeout_seconds, spans=spans, verify=outbound_tls),
        )
    load_client_keys(config)  # each private_key_file, once, before anything else is opened
    spans.name_endpoints(_endpoint_names(config))
    metrics = BrokerMetrics()
    if audit_sinks is None:
        configured = sink_from_config(config.audit)
        audit_sinks = [configured] if configured is not None else []
    auditor = Auditor([*audit_sinks, metrics], now=clock.now)
    source = key_source or key_source_for(config.keyring, os.environ)
    if isinstance(source, WrappedKeyringFile) and spans.enabled:
        source.root = TracedRootKey(source.root, spans)
    keyring = source.load()
    # Follow `keys add` / `keys promote` without a restart (see broker/keys.py).
    cipher = EnvelopeCipher(keyring, reload=KeyringFollower(source, keyring, logger))
    store = open_store(config.store)
    traced = spans.store(store)
    try:
        vault = CredentialVault(
            timed_store(traced, metrics), cipher, read_cache_seconds=config.read_cache_seconds
        )
        endpoints: dict[str, str] = {}
        for upstream in config.upstreams:
            if upstream.auth_broker.token_endpoint is not None:
                endpoints.setdefault(upstream.auth_broker.token_endpoint, upstream.name)
        tokens = MeteredTokenClient(
            metrics,
            endpoints,
            timeout=config.http.timeout_seconds,
            max_bytes=config.http.max_response_bytes,
            transport=transport,
            max_concurrent_requests=config.http.max_concurrent_requests,
            spans=spans,
            verify=outbound_tls,
        )
        exchanger = TokenExchanger(vault, tokens, clock, logger, auditor)
        policy = PolicyEnforcer(build_policy(config.policy), logger)
        service = BrokerService(config, vault, tokens, clock, logger, exchanger, policy, auditor)
    except BaseException:
        store.close()
        raise
    return Core(
        config,
        spans,
        metrics,
        auditor,
        source,
        keyring,
        store,
        traced,
        vault,
        tokens,
        exchanger,
        service,
        outbound_tls,
    )


def build_app(
    config: BrokerConfig,
    *,
    clock: Clock | None = None,
    key_source: KeySource | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    logger: logging.Logger | None = None,
    reuse_port: bool = False,
    audit_sinks: Sequence[AuditSink] | None = None,
) -> App:
    """Build every part from the config. Raises ConfigError, KeyringError, StoreError or OSError.

    ``audit_sinks`` replaces the configured sink (see build_core for the rest)."""
    logger = logger or get_logger()
    clock = clock or SystemClock()
    core = build_core(
        config,
        clock=clock,
        logger=logger,
        key_source=key_source,
        transport=transport,
        audit_sinks=audit_sinks,
    )
    config, spans, metrics, auditor, source = core.config, core.spans, core.metrics, core.auditor, core.source
    store, traced, vault, tokens, service = core.store, core.traced, core.vault, core.tokens, core.service
    exchanger = core.exchanger
    try:
        # A wrong keyring is refused; damaged records are not its concern (broker/key_checks.py).
        where = config.store.path if config.store.backend == "sqlite" else "postgres"
        name = getattr(source, "path", None) or getattr(source, "variable", None) or config.keyring.file
        StoreKeyCheck(store, str(name), str(where), now=clock.now(), logger=logger).verify(core.keyring)
        identity = None
        if config.identity is not None:
            identity = IdentityVerifier(
                config.identity,
                clock,
                timeout=config.http.timeout_seconds,
                transport=transport,
                logger=logger,
                spans=spans,
                verify=core.outbound_tls,
            )
        connections = ConnectionManager(config, vault, RevocationClient(tokens), clock)
        metrics.watch_single_flight(lambda: service.flights.coalesced)
        metrics.watch_credentials(lambda: store.count_credentials(clock.now()))
        metrics.watch_flow_refusals(lambda: service.flows_refused)
        flow_purger = FlowPurger(
            timed_store(traced, metrics), clock, config.flow_purge_interval_seconds, logger, auditor
        )
        reaper = Reaper(
            timed_store(traced, metrics),
            clock,
            config.retention,
            config.events,
            {u.key: u.name for u in config.upstreams},
            auditor,
            logger,
        )
        refresher: BackgroundRefresher | RefresherProcess | None = None
        if config.background_refresh.enabled and config.background_refresh.separate_process:
            refresher = RefresherProcess(config, logger, metrics.count_refresh_failures)
        elif config.background_refresh.enabled:
            refresher = BackgroundRefresher(config, timed_store(traced, metrics), service, clock, logger)
        if refresher is not None:
            stats = refresher.stats
            metrics.watch_background_refresh(lambda: dict(stats.outcomes), lambda: stats.lag_seconds)
        events = EventHub(
            timed_store(traced, metrics),
            {u.key: u.name for u in config.upstreams},
            EVENT_POLL_SECONDS if config.store.backend == "sqlite" else EVENT_FALLBACK_POLL_SECONDS,
            listen=getattr(store, "listen_events", None),
            logger=logger,
            read_cache=vault,
        )
        connect_server = None
        if config.connect is not None:
            hosted = HostedConnect(service, vault, clock, auditor, logger)
            connect_server = ConnectServer(
                config.connect, hosted, config.flow_ttl_seconds, logger, reuse_port=reuse_port
            )
        methods = pb_methods()
        interceptor = CallerInterceptor(
            CallerPolicy(config, methods),
            auditor,
            metrics,
            mutual_tls=config.tls is not None and config.tls.client_ca_file is not None,
        )
        server = BrokerServer(
            CredentialBrokerServicer(
                service,
                logger,
                UserAuthenticator(identity),
                auditor=auditor,
                connections=connections,
                events=events,
                offboarding=Offboarding(config, store, connections, auditor),
            ),
            config.listeners(),
            health_listen=config.health_listen,
            extra_handlers=extra_handlers,
            reuse_port=reuse_port,
            tls=config.tls,
            interceptors=(*_tracing_interceptors(spans), interceptor),
        )
    except BaseException:
        store.close()
        raise
    return App(
        config,
        store,
        vault,
        tokens,
        service,
        server,
        exchanger=exchanger,
        identity=identity,
        auditor=auditor,
        metrics=metrics,
        connections=connections,
        flow_purger=flow_purger,
        refresher=refresher,
        events=events,
        tracing=spans,
        reaper=reaper,
        connect_server=connect_server,
    )


def _endpoint_names(config: BrokerConfig) -> dict[str, str]:
    """Token and revocation endpoint URL -> the upstream's name, for trace spans."""
    names: dict[str, str] = {}
    for upstream in config.upstreams:
        for endpoint in (upstream.auth_broker.token_endpoint, upstream.auth_broker.revocation_endpoint):
            if endpoint is not None:
                names.setdefault(endpoint, upstream.name)
    return names


def _tracing_interceptors(spans: Spans) -> tuple[grpc.aio.ServerInterceptor, ...]:
    """The server-span interceptor, first of all, when tracing is on; none when off."""
    if not spans.enabled:
        return ()
    from broker.rpc.tracing import TracingInterceptor

    return (TracingInterceptor(spans),)


def pb_methods() -> list[str]:
    """The CredentialBroker RPC names, from the service descriptor."""
    from broker._proto.credentialbroker.v1 import broker_pb2 as pb

    return [m.name for m in pb.DESCRIPTOR.services_by_name[SERVICE_NAME.rpartition(".")[2]].methods]


class TracedRootKey:
    """A root key whose every wrap and unwrap is a ``kms`` client span (tracing on): the source's
    type and host, never a key id, a blob or key material."""

    def __init__(self, root: RootKey, spans: Spans) -> None:
        self._root = root
        self._spans = spans
        self.kind = root.kind
        endpoint = getattr(root, "endpoint_url", None)  # aws_kms; a PKCS#11 module has no host
        region = getattr(root, "region", None)
        if endpoint:
            self._host = urlsplit(endpoint).hostname or ""
        else:
            self._host = f"kms.{region}.amazonaws.com" if region else ""

    def describe(self) -> str:
        return self._root.describe()

    def wrap(self, kek_id: str, material: bytes) -> bytes:
        with self._spans.client("kms", server_address=self._host, key_source=self.kind):
            return self._root.wrap(kek_id, material)

    def unwrap(self, kek_id: str, blob: bytes, *, any_version: bool = False) -> bytes:
        with self._spans.client("kms", server_address=self._host, key_source=self.kind):
            return self._root.unwrap(kek_id, blob, any_version=any_version)

    def rewrap(self, kek_id: str, blob: bytes) -> bytes:
        with self._spans.client("kms", server_address=self._host, key_source=self.kind):
            return self._root.rewrap(kek_id, blob)
