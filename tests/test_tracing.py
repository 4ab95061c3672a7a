"""OpenTelemetry tracing (broker/tracing.py) against a real OTLP/gRPC receiver on loopback.

The receiver serves the collector's TraceService from the opentelemetry-proto definitions, so the
broker's real exporter sends real Export calls. Every span attribute that arrives goes through the
suite's leak check as well as the direct checks here.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_service
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.config import load_config
from broker.errors import ConfigError
from tests import leakcheck
from tests.authserver import AuthServer
from tests.conftest import REDIRECT_URI, BrokerFactory, upstream_doc
from tests.idp import IdentityProvider
from tests.test_token_exchange import EXCHANGE, exchange_doc

ROOT = Path(__file__).resolve().parent.parent
RESOLVE_SPAN = "credentialbroker.v1.CredentialBroker/Resolve"


class Receiver(trace_grpc.TraceServiceServicer):
    """A loopback OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[tuple[dict[str, Any], trace_pb2.Span]] = []
        self.exports = 0

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.exports += 1
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self._spans.append((resource, span))
        return trace_service.ExportTraceServiceResponse()

    @property
    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            return [span for _, span in self._spans]

    @property
    def resources(self) -> list[dict[str, Any]]:
        with self._lock:
            return [resource for resource, _ in self._spans]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(span: trace_pb2.Span) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"http://127.0.0.1:{port}"
    finally:
        server.stop(0)


def _observe(spans: list[trace_pb2.Span]) -> str:
    """Every name, attribute, event and status text of the spans, handed to the leak check."""
    parts = []
    for span in spans:
        parts += [span.name, span.status.message, repr(attributes(span))]
        parts += [
            event.name + repr({a.key: _value(a.value) for a in event.attributes}) for event in span.events
        ]
    text = "\n".join(parts)
    leakcheck.observe_text(text, "exported span")
    return text


@pytest.mark.parametrize("store_backend", ["sqlite", "postgres"])
async def test_resolve_spans_reach_an_otlp_receiver_under_the_callers_trace(
    make_broker: BrokerFactory, receiver: tuple[Receiver, str], store_backend: str
) -> None:
    collector, endpoint = receiver
    broker = await make_broker(
        tracing={"enabled": True, "endpoint": endpoint, "service_name": "broker-under-test"}
    )
    await broker.connect()  # a token-endpoint call (authorization_code)
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    answer = await broker.stub.Resolve(
        pb.ResolveRequest(user_id="alice", upstream="gh"),
        metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
    )
    assert answer.access_token
    # Health probes are not traced (a kubelet probes every few seconds).
    await health_pb2_grpc.HealthStub(broker.channel).Check(health_pb2.HealthCheckRequest(service=""))
    await broker.app.stop(grace=1)  # flushes the exporter

    spans = collector.spans
    text = _observe(spans)
    assert not [s for s in spans if "Health" in s.name]
    resolves = [s for s in spans if s.name == RESOLVE_SPAN]
    assert len(resolves) == 1, [s.name for s in spans]
    resolve = resolves[0]
    # The caller's W3C trace context is honoured: same trace, the caller's span as parent.
    assert resolve.trace_id.hex() == trace_id
    assert resolve.parent_span_id.hex() == parent_id
    assert resolve.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert attributes(resolve)["rpc.system"] == "grpc"
    assert attributes(resolve)["rpc.method"] == "Resolve"
    assert attributes(resolve)["rpc.grpc.status_code"] == 0
    assert {"service.name": "broker-under-test"}.items() <= collector.resources[0].items()

    # The connect flow's token request: a client span under the Complete server span.
    complete = next(s for s in spans if s.name == "credentialbroker.v1.CredentialBroker/Complete")
    token_calls = [s for s in spans if attributes(s).get("credential_broker.call") == "token"]
    assert len(token_calls) == 1, text
    token = token_calls[0]
    assert token.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert token.trace_id == complete.trace_id and token.parent_span_id == complete.span_id
    assert attributes(token)["credential_broker.upstream"] == "gh"
    assert attributes(token)["http.response.status_code"] == 200
    assert attributes(token)["server.address"] == "127.0.0.1"

    # Store operations are spans too, inside the RPC that made them.
    stored = [s for s in spans if s.name.startswith("store ")]
    assert any(s.parent_span_id == complete.span_id for s in stored), text
    system = {"sqlite": "sqlite", "postgres": "postgresql"}[store_backend]
    assert all(attributes(s)["db.system.name"] == system for s in stored)

    # Nothing secret in any span: no token, code, state, client secret, nor a URL with a query.
    for secret in [answer.access_token, *broker.auth.issued]:
        assert secret not in text
    assert "?" not in text and "/authorize" not in text


async def test_revocation_is_a_client_span_with_upstream_and_status(
    make_broker: BrokerFactory, receiver: tuple[Receiver, str], auth_server: AuthServer
) -> None:
    collector, endpoint = receiver
    client = auth_server.new_client(auth_method="client_secret_basic", redirect_uri=REDIRECT_URI)
    upstream = upstream_doc(auth_server, client, revocation_endpoint=auth_server.revocation_endpoint)
    broker = await make_broker(
        client=client, upstreams=[upstream], tracing={"enabled": True, "endpoint": endpoint}
    )
    await broker.connect()
    await broker.stub.Disconnect(pb.DisconnectRequest(user_id="alice", upstream="gh"))
    await broker.app.stop(grace=1)
    spans = collector.spans
    text = _observe(spans)
    revocations = [s for s in spans if attributes(s).get("credential_broker.call") == "revocation"]
    assert len(revocations) == 2, text  # the refresh token, then the access token
    for span in revocations:
        assert attributes(span)["credential_broker.upstream"] == "gh"
        assert attributes(span)["http.response.status_code"] == 200
    for secret in broker.auth.issued:
        assert secret not in text


async def test_a_call_without_trace_context_starts_its_own_trace(
    make_broker: BrokerFactory, receiver: tuple[Receiver, str]
) -> None:
    collector, endpoint = receiver
    broker = await make_broker(tracing={"enabled": True, "endpoint": endpoint})
    with pytest.raises(grpc.aio.AioRpcError):
        await broker.stub.Resolve(
            pb.ResolveRequest(user_id="nobody", upstream="gh"),
            metadata=(("traceparent", "00-not-a-valid-context-01"),),
        )
    await broker.app.stop(grace=1)
    resolve = next(s for s in collector.spans if s.name == RESOLVE_SPAN)
    assert resolve.parent_span_id == b""
    assert len(resolve.trace_id) == 16 and resolve.trace_id != bytes(16)
    assert attributes(resolve)["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert resolve.status.code == trace_pb2.Status.STATUS_CODE_ERROR


def _config(environ: dict[str, str], tmp_path: Path, **tracing: Any) -> Any:
    document: dict[str, Any] = {"keyring": {"file": str(tmp_path / "k.json")}}
    if tracing:
        document["tracing"] = tracing
    return load_config(document, environ=environ, base_dir=tmp_path)


def test_tracing_is_off_by_default_and_on_with_the_standard_variables(tmp_path: Path) -> None:
    assert _config({}, tmp_path).tracing.enabled is False
    on = _config({"OTEL_TRACES_EXPORTER": "otlp"}, tmp_path).tracing
    assert on.enabled and on.endpoint == "http://localhost:4317"
    on = _config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, tmp_path).tracing
    assert on.enabled and on.endpoint == "http://collector:4317"
    on = _config(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces:4317",
            "OTEL_SERVICE_NAME": "payments-broker",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        },
        tmp_path,
    ).tracing
    assert (on.endpoint, on.service_name, on.sample_ratio) == ("https://traces:4317", "payments-broker", 0.25)
    # The config file's own values win over the environment's.
    on = _config(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, tmp_path, endpoint="http://mine:4317"
    )
    assert on.tracing.endpoint == "http://mine:4317"
    assert _config({}, tmp_path, enabled=True).tracing.enabled
    # The standard off switches win over everything.
    for off in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        assert (
            _config(
                {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", **off}, tmp_path, enabled=True
            ).tracing.enabled
            is False
        )


@pytest.mark.parametrize(
    ("environ", "tracing", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, {}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            {},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"},
            {},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({}, {"enabled": True, "endpoint": "ftp://collector:21"}, "tracing.endpoint"),
        ({}, {"enabled": True, "sample_ratio": 2}, "tracing.sample_ratio"),
    ],
)
def test_bad_tracing_settings_are_refused_by_name(
    tmp_path: Path, environ: dict[str, str], tracing: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(environ, tmp_path, **tracing)
    assert named in str(caught.value)


def test_no_opentelemetry_module_is_loaded_when_tracing_is_off(tmp_path: Path) -> None:
    """Off costs nothing: a broker that serves a Resolve never imports opentelemetry."""
    script = f"""
import asyncio, sys
import grpc
from broker._proto.credentialbroker.v1 import broker_pb2 as pb, broker_pb2_grpc as pb_grpc
from broker.app import build_app
from broker.config import load_config
from broker.crypto import generate_keyring_file
from pathlib import Path
tmp = Path({str(tmp_path)!r})
generate_keyring_file(tmp / "k.json")
doc = {{"listen": ["127.0.0.1:0"], "store": {{"path": str(tmp / "b.db")}}, "keyring": {{"file": str(tmp / "k.json")}},
       "audit": {{"output": "none"}}}}
async def main():
    app = build_app(load_config(doc, environ={{}}, base_dir=tmp))
    await app.start()
    async with grpc.aio.insecure_channel(app.server.addresses[0]) as channel:
        try:
            await pb_grpc.CredentialBrokerStub(channel).Resolve(
                pb.ResolveRequest(user_id="a", upstream="x"), metadata=(("x-credential-broker-request", "true"),))
        except grpc.aio.AioRpcError as exc:
            print(exc.code().name)
    await app.stop(0)
asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NOT_FOUND", "[]"], result.stdout


async def test_an_unreachable_collector_does_not_break_or_stall_the_broker(
    make_broker: BrokerFactory,
) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    broker = await make_broker(tracing={"enabled": True, "endpoint": f"http://127.0.0.1:{port}"})
    await broker.connect()
    assert (await broker.resolve()).access_token
    started = time.monotonic()
    await broker.app.stop(grace=1)
    assert time.monotonic() - started < 15  # the export gives up within its bound


async def test_identity_discovery_jwks_and_token_exchange_are_client_spans(
    make_broker: BrokerFactory, receiver: tuple[Receiver, str], auth_server: AuthServer, idp: IdentityProvider
) -> None:
    collector, endpoint = receiver
    client = auth_server.new_client(auth_method="client_secret_basic", redirect_uri=REDIRECT_URI)
    # This upstream's endpoints come from its issuer's RFC 8414 metadata, fetched at start.
    discovered = upstream_doc(
        auth_server, client, issuer=auth_server.issuer, authorization_endpoint=None, token_endpoint=None
    )
    broker = await make_broker(
        client=client,
        upstreams=[discovered, exchange_doc(auth_server)],
        identity={"issuer": idp.issuer, "audiences": ["broker"], "algorithms": ["RS256", "ES256"]},
        tracing={"enabled": True, "endpoint": endpoint},
    )
    user_token = idp.sign(idp.claims("alice"), "rsa-1")
    auth_server.exchange_users[user_token] = "alice"
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    answer = await broker.stub.Resolve(
        pb.ResolveRequest(user_id="alice", upstream=EXCHANGE),
        metadata=(
            ("authorization", f"Bearer {user_token}"),
            ("traceparent", f"00-{trace_id}-{parent_id}-01"),
        ),
    )
    await broker.app.stop(grace=1)
    spans = collector.spans
    text = _observe(spans)
    by_call: dict[str, list[trace_pb2.Span]] = {}
    for span in spans:
        by_call.setdefault(attributes(span).get("credential_broker.call", ""), []).append(span)
    resolve = next(s for s in spans if s.name == RESOLVE_SPAN)
    # The IdP's discovery document and JWKS, then the exchange: all inside the caller's trace.
    inside = [by_call["jwks"][0], by_call["token"][0]]
    inside += [s for s in by_call["discovery"] if "credential_broker.upstream" not in attributes(s)]
    assert len(inside) == 3, text
    for span in inside:
        assert span.trace_id.hex() == trace_id and span.parent_span_id == resolve.span_id
        assert span.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert attributes(span)["http.response.status_code"] == 200
    assert attributes(by_call["token"][0])["credential_broker.upstream"] == EXCHANGE
    # RFC 8414 discovery at start-up: its own trace, naming the upstream it was for.
    at_start = [s for s in by_call["discovery"] if attributes(s).get("credential_broker.upstream") == "gh"]
    assert at_start and all(s.parent_span_id == b"" for s in at_start), text
    assert attributes(at_start[0])["http.response.status_code"] == 200
    for secret in [user_token, answer.access_token, *broker.auth.issued]:
        assert secret not in text


def test_tracing_on_without_the_otel_extra_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    """As if `pip install credential-broker` had been run without [otel]."""
    (tmp_path / "config.yaml").write_text(
        f"listen: ['127.0.0.1:0']\nstore: {{path: {tmp_path / 'b.db'}}}\n"
        f"keyring: {{file: {tmp_path / 'k.json'}}}\ntracing: {{enabled: true}}\n"
    )
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # the package is not installed\n"
        "from broker.cli import main\n"
        f"raise SystemExit(main(['keys', 'generate', '--output', {str(tmp_path / 'k.json')!r}]) "
        f"or main(['serve', '--config', {str(tmp_path / 'config.yaml')!r}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "credential-broker[otel]" in result.stderr, result.stderr
