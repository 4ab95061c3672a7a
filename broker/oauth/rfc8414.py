"""RFC 8414 authorization server metadata (and OpenID Connect Discovery 1.0 as a fallback).

An upstream may name only its ``issuer``; at start-up the broker fetches the metadata once,
checks it (section 3.3: the document's ``issuer`` must equal the configured one) and fills in
the endpoints the config does not name. The documents are cached per issuer for the process.
"""

from __future__ import annotations

import json
import ssl
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from broker.config import BrokerConfig, check_endpoint_url
from broker.errors import ConfigError
from broker.oauth.tls import certificate_problem
from broker.tracing import NO_SPANS, Spans

MAX_METADATA_BYTES = 256 * 1024
_ENDPOINTS = (
    "token_endpoint",
    "authorization_endpoint",
    "revocation_endpoint",
    "pushed_authorization_request_endpoint",  # RFC 9126 section 5
)


def metadata_urls(issuer: str) -> list[str]:
    """Section 3.1: ``/.well-known/oauth-authorization-server`` is inserted between the host
    and the issuer's path; OpenID Discovery appends ``/.well-known/openid-configuration``."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    rfc8414 = urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")
    )
    oidc = urlunsplit((parts.scheme, parts.netloc, path + "/.well-known/openid-configuration", "", ""))
    return [rfc8414, oidc]


def parse_metadata(issuer: str, status: int, body: bytes) -> dict[str, Any]:
    """Check a metadata answer; raises ValueError with a safe reason."""
    if status != 200:
        raise ValueError(f"HTTP {status}")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the decoder's limit
        raise ValueError("not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    if document.get("issuer") != issuer:
        # Section 3.3: a mismatch means the document is not this issuer's; never use it.
        raise ValueError("its issuer is not the configured issuer")
    for name in _ENDPOINTS:
        value = document.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{name} is not a string")
        try:
            check_endpoint_url(value)
        except ValueError as exc:
            raise ValueError(f"{name} {exc}") from None
    return document


class MetadataCache:
    """Fetches each issuer's metadata once and keeps it."""

    def __init__(
        self,
        *,
        timeout: float,
        transport: httpx.BaseTransport | None = None,
        spans: Spans = NO_SPANS,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._spans = spans
        self._verify = verify
        self._documents: dict[str, dict[str, Any]] = {}
        self._timeout = timeout
        self._transport = transport

    def get(self, issuer: str, upstream: str | None = None) -> dict[str, Any]:
        """The issuer's metadata; raises ValueError with a safe reason. ``upstream`` names the
        upstream it is for in the trace span of each fetch."""
        cached = self._documents.get(issuer)
        if cached is not None:
            return cached
        problems = []
        with httpx.Client(
            timeout=self._timeout,
            transport=self._transport,
            verify=self._verify,
            follow_redirects=False,
            trust_env=False,
        ) as http:
            for url in metadata_urls(issuer):
                # The timeout bounds each fetch as a whole, not only each read: a server that
                # drips its document a byte at a time is cut once the deadline has passed (after
                # at most one more read), instead of holding start-up for as long as it drips.
                deadline = time.monotonic() + self._timeout
                try:
                    with (
                        self._spans.http("discovery", "GET", url, upstream=upstream) as span,
                        http.stream("GET", url, headers={"Accept": "application/json"}) as resp,
                    ):
                        span.status(resp.status_code)
                        body = b""
                        for chunk in resp.iter_bytes():
                            body += chunk
                            if len(body) > MAX_METADATA_BYTES:
                                raise ValueError("too large")
                            if time.monotonic() > deadline:
                                raise ValueError("timed out")
                    document = parse_metadata(issuer, resp.status_code, body)
                except httpx.HTTPError as exc:
                    problem = certificate_problem(exc)
                    problems.append(
                        f"{url}: " + (f"certificate not trusted: it {problem}" if problem else "unreachable")
                    )
                    continue
                except ValueError as exc:
                    problems.append(f"{url}: {exc}")
                    continue
                self._documents[issuer] = document
                return document
        raise ValueError("; ".join(problems))


def apply_discovery(config: BrokerConfig, cache: MetadataCache) -> BrokerConfig:
    """The config with every upstream's missing endpoints taken from its issuer's metadata."""
    upstreams = []
    for index, upstream in enumerate(config.upstreams):
        auth = upstream.auth_broker
        if auth.issuer is None:
            upstreams.append(upstream)
            continue
        where = f"upstreams[{index}].auth_broker.issuer"
        try:
            document = cache.get(auth.issuer, upstream.name)
        except ValueError as exc:
            raise ConfigError(f"{where}: metadata could not be used ({exc})") from None
        update: dict[str, Any] = {}
        for name in _ENDPOINTS:
            if getattr(auth, name) is None and isinstance(document.get(name), str):
                update[name] = document[name]
        if auth.authorization_response_iss_parameter_supported is None:
            update["authorization_response_iss_parameter_supported"] = (
                document.get("authorization_response_iss_parameter_supported") is True
            )
        if auth.pushed_authorization_requests is None:
            # RFC 9126 section 5: the server refuses authorization requests that were not pushed.
            update["pushed_authorization_requests"] = (
                document.get("require_pushed_authorization_requests") is True
            )
        auth = auth.model_copy(update=update)
        if auth.pushed_authorization_requests and auth.pushed_authorization_request_endpoint is None:
            raise ConfigError(
                f"{where}: the metadata requires pushed authorization requests but names no "
                "pushed_authorization_request_endpoint; set pushed_authorization_request_endpoint"
            )
        if auth.token_endpoint is None:
            raise ConfigError(f"{where}: the metadata names no token_endpoint; set token_endpoint")
        if auth.mode.value == "oauth_connect" and auth.authorization_endpoint is None:
            raise ConfigError(
                f"{where}: the metadata names no authorization_endpoint; set authorization_endpoint"
            )
        upstreams.append(upstream.model_copy(update={"auth_broker": auth}))
    return config.model_copy(update={"upstreams": tuple(upstreams)})
