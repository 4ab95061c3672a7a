"""The tracing hooks with OpenTelemetry: spans exported over OTLP/gRPC.

Imported only when tracing is on (broker/tracing/__init__.py). Its own TracerProvider, not the
process-global one, so two brokers in one process (tests) never share an exporter.

What a span may carry is a closed list: RPC service, method and status code; for outbound calls
the kind of call, the upstream's configured name, the server's host and port, the HTTP method
and status; for store operations the operation's name and the database system. Never a user id,
a URL's path or query, a header, a token, a secret, or an exception's text (only its error code
or type name).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from broker.errors import BrokerError
from broker.tracing import CallRecord, ServerRecord, Spans
from broker.tracing.config import TracingConfig

StoreT = TypeVar("StoreT")

# Bounds on what an unreachable collector can cost: each export attempt, and stop().
EXPORT_TIMEOUT_SECONDS = 5.0
SHUTDOWN_TIMEOUT_SECONDS = 10.0
_DB_SYSTEMS = {"sqlite": "sqlite", "postgres": "postgresql"}


def _broker_version() -> str:
    try:
        return version("credential-broker")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _reason(exc: BaseException) -> str:
    """A failure as a span may show it: our stable error code, else the exception's type name."""
    return exc.code if isinstance(exc, BrokerError) else type(exc).__name__


class _HttpRecord(CallRecord):
    def __init__(self, span: Span, attribute: str) -> None:
        self._span = span
        self._attribute = attribute

    def status(self, code: int) -> None:
        self._span.set_attribute(self._attribute, code)
        if code >= 400:
            self._span.set_status(Status(StatusCode.ERROR))


class _RpcRecord(ServerRecord):
    def __init__(self, span: Span) -> None:
        self._span = span

    def finish(self, code: int) -> None:
        self._span.set_attribute("rpc.grpc.status_code", code)
        if code != 0:
            self._span.set_status(Status(StatusCode.ERROR))


class OtelSpans(Spans):
    """Spans recorded by an OpenTelemetry SDK TracerProvider and sent by a batch OTLP exporter."""

    enabled = True

    def __init__(self, config: TracingConfig, *, store_system: str = "") -> None:
        assert config.endpoint is not None and config.service_name is not None  # resolved by config
        ratio = 1.0 if config.sample_ratio is None else config.sample_ratio
        resource = Resource({"service.name": config.service_name, "service.version": _broker_version()})
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(ratio)))
        exporter = OTLPSpanExporter(
            endpoint=config.endpoint,
            insecure=urlsplit(config.endpoint).scheme == "http",
            timeout=EXPORT_TIMEOUT_SECONDS,
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, export_timeout_millis=int(EXPORT_TIMEOUT_SECONDS * 1000))
        )
        self._tracer = self._provider.get_tracer("credential_broker", _broker_version())
        self._propagator = TraceContextTextMapPropagator()
        self._db_system = _DB_SYSTEMS.get(store_system, store_system)
        self._names: dict[str, str] = {}

    def name_endpoints(self, upstream_by_endpoint: dict[str, str]) -> None:
        self._names = dict(upstream_by_endpoint)

    # -- server ---------------------------------------------------------------------------

    @contextmanager
    def server(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Iterator[ServerRecord]:
        # W3C Trace Context (traceparent, tracestate); an invalid one starts a new trace.
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        parent = self._propagator.extract(carrier)
        service, _, name = method.lstrip("/").partition("/")
        with self._tracer.start_as_current_span(
            method.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield _RpcRecord(span)

    # -- clients --------------------------------------------------------------------------

    def http(
        self, call: str, method: str, url: str, *, upstream: str | None = None
    ) -> AbstractContextManager[CallRecord]:
        parts = urlsplit(url)
        name = upstream or self._names.get(url, "")
        attributes: dict[str, str | int] = {
            "credential_broker.call": call,
            "http.request.method": method,
            "server.address": parts.hostname or "",
            "url.scheme": parts.scheme,
        }
        if parts.port is not None:
            attributes["server.port"] = parts.port
        return self._client_span(f"{method} {call}", name, attributes, "http.response.status_code")

    def client(
        self,
        call: str,
        *,
        server_address: str = "",
        server_port: int | None = None,
        upstream: str = "",
        key_source: str = "",
    ) -> AbstractContextManager[CallRecord]:
        attributes: dict[str, str | int] = {"credential_broker.call": call, "server.address": server_address}
        if server_port is not None:
            attributes["server.port"] = server_port
        if key_source:
            attributes["credential_broker.key_source"] = key_source
        return self._client_span(call, upstream, attributes, "credential_broker.status_code")

    @contextmanager
    def _client_span(
        self, span_name: str, upstream: str, attributes: dict[str, str | int], status_attribute: str
    ) -> Iterator[CallRecord]:
        if upstream:
            attributes["credential_broker.upstream"] = upstream
        with self._tracer.start_as_current_span(
            span_name,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield _HttpRecord(span, status_attribute)
            except BaseException as exc:
                span.set_attribute("error.type", _reason(exc))
                span.set_status(Status(StatusCode.ERROR, _reason(exc)))
                raise

    # -- store ----------------------------------------------------------------------------

    def store(self, store: StoreT) -> StoreT:
        return cast(StoreT, _TracedStore(store, self._operation))

    @contextmanager
    def _operation(self, name: str) -> Iterator[None]:
        # Only inside a traced call: a background poll (connection events, refresh scans)
        # would otherwise make a new one-span trace every few seconds.
        if not get_current_span().get_span_context().is_valid:
            yield
            return
        with self._tracer.start_as_current_span(
            f"store {name}",
            kind=SpanKind.CLIENT,
            attributes={"db.system.name": self._db_system, "db.operation.name": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as exc:
                span.set_attribute("error.type", _reason(exc))
                span.set_status(Status(StatusCode.ERROR, _reason(exc)))
                raise

    async def shutdown(self) -> None:
        """Flush and stop the exporter, off the event loop, bounded in time."""
        # An unreachable collector: its spans are dropped, the broker stops anyway.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self._provider.shutdown), SHUTDOWN_TIMEOUT_SECONDS)


class _TracedStore:
    """A store whose every public operation is a span; attributes pass through.

    Wrappers are made on first use and kept (as metrics.TimedStore does)."""

    def __init__(self, store: Any, operation: Callable[[str], AbstractContextManager[None]]) -> None:
        self._store = store
        self._operation = operation
        self.schema_version = getattr(store, "schema_version", None)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        operation = self._operation

        def traced(*args: Any, **kwargs: Any) -> Any:
            with operation(name):
                return attr(*args, **kwargs)

        setattr(self, name, traced)
        return traced
