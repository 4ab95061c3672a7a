"""The one place an upstream's client authentication is built from its config.

A client secret, nothing (a public client), or private_key_jwt (RFC 7523 section 2.2): with
``private_key_file`` the broker signs a fresh assertion for each request with a key loaded once
(at start-up, by ``client_key_problems``/``load_client_keys``, then kept); with
``client_assertion_file`` the JWT is re-read from the file for each request. The assertion's
audience is the upstream's token endpoint, from the operator's config or its issuer's metadata:
nothing a caller sends can change it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path

from broker import endpoint_templates
from broker.config import BrokerConfig, ClientAuthMethod, UpstreamConfig
from broker.config_errors import format_errors
from broker.crypto.signing_key import SigningKey, load_signing_key
from broker.errors import ConfigError
from broker.oauth import rfc7523
from broker.oauth.client import ClientCredentials


@lru_cache(maxsize=256)
def signing_key(path: Path, kid: str | None, certificate: Path | None = None) -> SigningKey:
    """The key of ``private_key_file``, read once per process (ValueError is not cached)."""
    return load_signing_key(path, kid, certificate)


def client_key_problems(config: BrokerConfig) -> list[str]:
    """One line per upstream whose private_key_file cannot be used (and each good key loaded)."""
    problems = []
    for index, upstream in enumerate(config.upstreams):
        auth = upstream.auth_broker
        if auth.token_endpoint_auth_method is ClientAuthMethod.PRIVATE_KEY_JWT and auth.private_key_file:
            where = f"upstreams[{index}].auth_broker"
            try:
                signing_key(auth.private_key_file, auth.key_id)
            except ValueError as exc:
                problems.append(f"{where}.private_key_file: {exc}")
                continue
            if auth.certificate_file is not None:
                try:
                    signing_key(auth.private_key_file, auth.key_id, auth.certificate_file)
                except ValueError as exc:
                    problems.append(f"{where}.certificate_file: {exc}")
    return problems


def load_client_keys(config: BrokerConfig) -> None:
    """Load every private_key_file now; ConfigError (one line per problem) if any cannot be used."""
    problems = client_key_problems(config)
    if problems:
        raise ConfigError(format_errors(problems))


def client_credentials(upstream: UpstreamConfig, params: Sequence[tuple[str, str]] = ()) -> ClientCredentials:
    """How to authenticate to ``upstream``'s authorization server, for one request. ``params``:
    the connection's params, which fill a templated token endpoint (the assertion's audience)."""
    auth = upstream.auth_broker
    secret = auth.client_secret.get_secret_value() if auth.client_secret else None
    assertion: Callable[[], str] | None = None
    if auth.token_endpoint_auth_method is ClientAuthMethod.PRIVATE_KEY_JWT:
        assert auth.client_id is not None and auth.token_endpoint is not None  # by config
        if auth.private_key_file is not None:
            key = signing_key(auth.private_key_file, auth.key_id, auth.certificate_file)
            audience = endpoint_templates.fill(auth.token_endpoint, dict(params), auth.connection_patterns())
            assertion = partial(rfc7523.signed_assertion, key, auth.client_id, audience)
        else:
            assert auth.client_assertion_file is not None  # by config
            assertion = partial(rfc7523.file_assertion, auth.client_assertion_file)
    return ClientCredentials(auth.client_id, secret, auth.token_endpoint_auth_method, assertion)
