"""Tracing hooks: where the broker opens spans, and what they cost when tracing is off.

The rest of the broker calls the hooks of a :class:`Spans`:

- ``server(method, metadata)`` around each RPC (broker/rpc/tracing.py, installed only when on);
- ``http(call, method, url, upstream=...)`` around each HTTP call to an authorization server or
  identity provider: ``call`` is ``token``, ``revocation``, ``discovery`` or ``jwks``;
- ``client(call, server_address=..., upstream=...)`` around any other outbound call (a KMS
  call: ``spans.client("kms", server_address=host)``), recording a status with ``.status(n)``;
- ``store(store)`` wraps a store so that each operation is a span.

With tracing off (the default) these are :data:`NO_SPANS`: the server hook is not installed at
all, ``store`` returns the store itself, and the client hooks are one shared no-op context
manager. Nothing imports opentelemetry until :func:`start_tracing` is called with tracing on
(broker/tracing/otel.py holds everything that does).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TypeVar

from broker.errors import ConfigError
from broker.tracing.config import TracingConfig

StoreT = TypeVar("StoreT")


class CallRecord:
    """What a client span learns while it is open (the no-op records nothing)."""

    def status(self, code: int) -> None:
        """The answer's HTTP status (or another protocol's numeric status)."""


class ServerRecord:
    """What a server span learns: the RPC's gRPC status code (the no-op records nothing)."""

    def finish(self, code: int) -> None:
        """The call's final gRPC status code (0 is OK)."""


class _NoSpan(AbstractContextManager[CallRecord]):
    """One shared no-op context manager for every client hook while tracing is off."""

    _record = CallRecord()

    def __enter__(self) -> CallRecord:
        return self._record

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


_NO_SPAN = _NoSpan()


class Spans:
    """The hooks with tracing off: they do nothing. broker/tracing/otel.py overrides each."""

    enabled = False

    def server(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]]
    ) -> AbstractContextManager[ServerRecord]:
        """A server span for one RPC (``/package.Service/Method``), under the caller's W3C
        trace context when ``metadata`` carries a valid ``traceparent``."""
        raise NotImplementedError("the server hook is installed only when tracing is on")

    def http(
        self, call: str, method: str, url: str, *, upstream: str | None = None
    ) -> AbstractContextManager[CallRecord]:
        """A client span for one HTTP call; only the URL's host and port are recorded."""
        return _NO_SPAN

    def client(
        self,
        call: str,
        *,
        server_address: str = "",
        server_port: int | None = None,
        upstream: str = "",
        key_source: str = "",
    ) -> AbstractContextManager[CallRecord]:
        """A client span for one outbound call of another kind (``kms``: a root key source's wrap
        or unwrap, with ``key_source`` its type)."""
        return _NO_SPAN

    def store(self, store: StoreT) -> StoreT:
        """``store`` with each operation a span (with tracing off: ``store`` itself)."""
        return store

    def name_endpoints(self, upstream_by_endpoint: dict[str, str]) -> None:
        """Name the upstream of HTTP calls that do not say (revocation endpoint URL -> name)."""

    async def shutdown(self) -> None:
        """Send what is buffered and stop exporting."""


NO_SPANS = Spans()


def start_tracing(config: TracingConfig, *, store_system: str = "") -> Spans:
    """The hooks for ``config`` (already resolved by load_config): :data:`NO_SPANS` when off,
    else spans exported over OTLP/gRPC. ``store_system``: the store backend's name. Raises
    ConfigError when tracing is on but the ``otel`` extra is not installed."""
    if not config.enabled:
        return NO_SPANS
    try:
        from broker.tracing.otel import OtelSpans  # imports opentelemetry: only when on
    except ImportError:
        raise ConfigError(
            "tracing: is on (tracing.enabled or OTEL_* variables) but OpenTelemetry is not installed; "
            "install credential-broker[otel], or turn tracing off"
        ) from None
    return OtelSpans(config, store_system=store_system)


__all__ = ["NO_SPANS", "CallRecord", "ServerRecord", "Spans", "TracingConfig", "start_tracing"]
