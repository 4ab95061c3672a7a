"""The ``tracing:`` config section and how the standard ``OTEL_*`` variables fill it in.

A leaf (pydantic and the error types only): broker/config.py validates the section and calls
:func:`resolve_tracing` with the environment it was given; broker/tracing/ acts on the result.

Tracing is off unless one of these turns it on:

- ``tracing.enabled: true`` in the config;
- ``OTEL_TRACES_EXPORTER=otlp``;
- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (non-empty).

``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turns it off whatever else says on.
Values in the config file win over the environment's; the environment's over the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from broker.errors import ConfigError

DEFAULT_ENDPOINT = "http://localhost:4317"  # the OTLP/gRPC default (OpenTelemetry spec)
DEFAULT_SERVICE_NAME = "credential-broker"
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
_ON_SAMPLERS = ("always_on", "parentbased_always_on")


class TracingConfig(BaseModel):
    """OpenTelemetry traces, exported over OTLP/gRPC (broker/tracing/).

    ``endpoint``: the collector, ``http://host:port`` (plaintext) or ``https://host:port`` (TLS).
    ``sample_ratio``: the share of new traces recorded; a caller's sampled flag is always
    followed (parent-based sampling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    endpoint: str | None = None
    service_name: str | None = Field(default=None, min_length=1, max_length=256)
    sample_ratio: float | None = Field(default=None, ge=0, le=1)


def resolve_tracing(config: TracingConfig, environ: Mapping[str, str]) -> TracingConfig:
    """The section with every value decided (from the file, then ``environ``, then defaults).

    Raises ConfigError naming the variable or key that cannot be used."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter not in ("", "otlp", "none"):
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: {exporter[:32]!r} is not supported; use otlp (or none to turn tracing off)"
        )
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip().lower()
        if protocol not in ("", "grpc"):
            raise ConfigError(
                f"{name}: {protocol[:32]!r} is not supported; the broker exports OTLP over grpc"
            )
    env_endpoint = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )
    enabled = config.enabled or exporter == "otlp" or bool(env_endpoint)
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter == "none":
        enabled = False
    endpoint = config.endpoint or env_endpoint or DEFAULT_ENDPOINT
    where = "tracing.endpoint" if config.endpoint else "OTEL_EXPORTER_OTLP_ENDPOINT"
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{where}: must be http://host:port or https://host:port (the OTLP/gRPC collector)")
    return config.model_copy(
        update={
            "enabled": enabled,
            "endpoint": endpoint,
            "service_name": config.service_name
            or environ.get("OTEL_SERVICE_NAME", "").strip()
            or DEFAULT_SERVICE_NAME,
            "sample_ratio": config.sample_ratio if config.sample_ratio is not None else _env_ratio(environ),
        }
    )


def _env_ratio(environ: Mapping[str, str]) -> float:
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("", *_ON_SAMPLERS):
        return 1.0
    if sampler not in _RATIO_SAMPLERS:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER: {sampler[:32]!r} is not supported; use parentbased_traceidratio "
            "(with OTEL_TRACES_SAMPLER_ARG) or parentbased_always_on"
        )
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "1").strip()
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0 <= ratio <= 1:
        raise ConfigError("OTEL_TRACES_SAMPLER_ARG: must be a number from 0 to 1")
    return ratio
