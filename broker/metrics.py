"""Prometheus metrics (prometheus-client), served on their own port when configured.

Every metric lives in the app's own CollectorRegistry, so two brokers in one process (tests)
never share counters. Labels are closed sets (method, status code, upstream name, grant type,
outcome class, error code, store operation): never a user id, never a token.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.audit import AuditEvent
from broker.errors import TokenRequestRejected, UpstreamUnavailable
from broker.oauth.client import ClientCredentials, TokenEndpointClient
from broker.oauth.rfc6749 import TokenResponse
from broker.store.base import CredentialStore

PREFIX = "credential_broker"


class BrokerMetrics:
    """The broker's metrics. Also an audit sink: refresh failures are counted from events."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc = _RpcStats()
        r.register(self.rpc)
        self.token_requests = Counter(
            f"{PREFIX}_token_requests",
            "Token-endpoint calls, by upstream, grant type and outcome class",
            ["upstream", "grant", "outcome"],
            registry=r,
        )
        self.refresh_failures = Counter(
            f"{PREFIX}_refresh_failures",
            "Failed refreshes, by upstream and error class",
            ["upstream", "error"],
            registry=r,
        )
        self.store_duration = Histogram(
            f"{PREFIX}_store_operation_seconds",
            "Store operation latency, by operation",
            ["operation"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
            registry=r,
        )
        self._server: Any = None

    # -- sources ------------------------------------------------------------------------

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        stats = self.rpc.by_label.get((method, code))
        if stats is None:
            stats = self.rpc.by_label[(method, code)] = [0.0] * (len(RPC_BUCKETS) + 2)
        # [bucket counts..., the +Inf bucket, sum of seconds]; the count is the sum of buckets.
        stats[bisect_left(RPC_BUCKETS, seconds)] += 1
        stats[-1] += seconds

    def emit(self, event: AuditEvent) -> None:
        if event.action == "refresh" and event.outcome == "failure":
            self.refresh_failures.labels(event.upstream, event.reason or "unknown").inc()

    def count_refresh_failures(self, upstream: str, reason: str, count: int) -> None:
        """Refresh failures another process made (the background refresh process) and reported."""
        self.refresh_failures.labels(upstream, reason).inc(count)

    def watch_single_flight(self, coalesced: Callable[[], int]) -> None:
        self.registry.register(_Coalesced(coalesced))

    def watch_credentials(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_CredentialsByStatus(counts))

    def watch_flow_refusals(self, refused: Callable[[], int]) -> None:
        """Count new connect flows refused because max_pending_flows_total were pending."""
        self.registry.register(_FlowRefusals(refused))

    # -- endpoint -----------------------------------------------------------------------

    def watch_background_refresh(
        self, outcomes: Callable[[], dict[tuple[str, str], int]], lag: Callable[[], float]
    ) -> None:
        """Background refreshes (broker/refresher.py) by upstream and outcome, and the latest
        tick's lag behind schedule."""
        self.registry.register(_BackgroundRefresh(outcomes, lag))

    def serve(self, address: str) -> str:
        """Serve /metrics on ``host:port`` (port 0 picks one); returns the bound address."""
        host, _, port = address.rpartition(":")
        httpd, _thread = start_http_server(int(port), host.strip("[]"), self.registry)
        self._server = httpd
        return f"{host}:{httpd.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _RpcStats(Collector):
    """RPC counts and latencies by (method, code), kept as plain numbers.

    This is on every RPC's path: prometheus-client's Counter and Histogram take a lock and
    update several values per observation, so the broker counts into a list per label pair
    and builds the two families only when scraped. Observations come from the event loop's
    thread alone; a scrape (another thread) reads a list that may be one observation behind."""

    def __init__(self) -> None:
        self.by_label: dict[tuple[str, str], list[float]] = {}

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}_rpc_requests", "RPCs handled, by method and status code", labels=["method", "code"]
        )
        duration = HistogramMetricFamily(
            f"{PREFIX}_rpc_duration_seconds",
            "RPC latency, by method and status code",
            labels=["method", "code"],
        )
        for (method, code), stats in sorted(self.by_label.items()):
            snapshot = list(stats)
            cumulative = list(accumulate(snapshot[:-1]))
            buckets = [
                (str(float(bound)), count) for bound, count in zip(RPC_BUCKETS, cumulative[:-1], strict=True)
            ]
            buckets.append(("+Inf", cumulative[-1]))
            requests.add_metric([method, code], cumulative[-1])
            duration.add_metric([method, code], buckets, sum_value=snapshot[-1])
        yield requests
        yield duration


class _Coalesced(Collector):
    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_singleflight_coalesced",
            "Calls that joined an in-flight refresh instead of starting one",
        )
        family.add_metric([], self._read())
        yield family


class _FlowRefusals(Collector):
    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_pending_flows_refused",
            "New connect flows refused because max_pending_flows_total flows were pending",
        )
        family.add_metric([], self._read())
        yield family


class _BackgroundRefresh(Collector):
    def __init__(self, outcomes: Callable[[], dict[tuple[str, str], int]], lag: Callable[[], float]) -> None:
        self._outcomes = outcomes
        self._lag = lag

    def collect(self) -> Iterable[Metric]:
        counts = CounterMetricFamily(
            f"{PREFIX}_background_refreshes",
            "Background refreshes by upstream and outcome: done (this process made the grant), "
            "failed, skipped (no longer due, or done by another process or a Resolve)",
            labels=["upstream", "outcome"],
        )
        for (upstream, outcome), count in sorted(self._outcomes().items()):
            counts.add_metric([upstream, outcome], count)
        yield counts
        lag = GaugeMetricFamily(
            f"{PREFIX}_background_refresh_lag_seconds",
            "How far behind its schedule the most overdue credential of the latest tick was",
        )
        lag.add_metric([], self._lag())
        yield lag


class _CredentialsByStatus(Collector):
    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            f"{PREFIX}_credentials", "Stored credentials, by status", labels=["status"]
        )
        try:
            counts = self._read()
        except Exception:  # a failed store read must not break the scrape of everything else
            counts = {}
        for status, count in sorted(counts.items()):
            family.add_metric([status], count)
        yield family


class MeteredTokenClient(TokenEndpointClient):
    """A TokenEndpointClient that counts its calls by upstream, grant and outcome class."""

    def __init__(self, metrics: BrokerMetrics, upstream_by_endpoint: dict[str, str], **kw: Any) -> None:
        super().__init__(**kw)
        self._metrics = metrics
        self._names = upstream_by_endpoint

    async def request_token(
        self,
        endpoint: str,
        form: Sequence[tuple[str, str]],
        credentials: ClientCredentials,
        *,
        upstream: str | None = None,
        deadline: float | None = None,
        **options: Any,
    ) -> TokenResponse:
        grant = next((v for k, v in form if k == "grant_type"), "")
        outcome = "error"
        try:
            response = await super().request_token(
                endpoint, form, credentials, upstream=upstream, deadline=deadline, **options
            )
            outcome = "ok"
            return response
        except TokenRequestRejected:
            outcome = "rejected"
            raise
        except UpstreamUnavailable:
            outcome = "unavailable"
            raise
        finally:
            name = upstream or self._names.get(endpoint, "unknown")
            self._metrics.token_requests.labels(name, grant, outcome).inc()


class TimedStore:
    """Times every store operation (by method name); attributes pass through to the real store.

    Wrappers are made on first use and kept, so later calls cost one closure call."""

    def __init__(self, store: CredentialStore, metrics: BrokerMetrics) -> None:
        self._store = store
        self._hist = metrics.store_duration
        self.schema_version = store.schema_version

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        observe = self._hist.labels(name).observe

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                observe(time.perf_counter() - started)

        setattr(self, name, timed)
        return timed


def timed_store(store: CredentialStore, metrics: BrokerMetrics) -> CredentialStore:
    """``store`` with every operation timed into ``metrics``."""
    return cast(CredentialStore, TimedStore(store, metrics))
