"""Configuration: a YAML document validated at start-up.

The environment is a parameter (``environ``), not a global, so tests pass their own. Every
error names the field it is about, e.g. ``upstreams[0].auth_broker.token_endpoint: required``.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from broker import endpoint_templates
from broker.config_errors import format_errors, validation_problems
from broker.errors import ConfigError
from broker.event_loop import Kind as EventLoopKind
from broker.models import upstream_key
from broker.tracing.config import TracingConfig, resolve_tracing

DEFAULT_LISTEN = "127.0.0.1:50051"


class Mode(StrEnum):
    OAUTH_CONNECT = "oauth_connect"
    TOKEN_EXCHANGE = "token_exchange"
    ENTRA_OBO = "entra_obo"


class ClientAuthMethod(StrEnum):
    """RFC 6749 section 2.3 / RFC 8414 token_endpoint_auth_methods."""

    CLIENT_SECRET_BASIC = "client_secret_basic"
    CLIENT_SECRET_POST = "client_secret_post"
    NONE = "none"
    # RFC 7523 section 2.2 / OpenID Connect Core 1.0 section 9: a JWT signed with the client's
    # private key (``private_key_file``), or one read from ``client_assertion_file``.
    PRIVATE_KEY_JWT = "private_key_jwt"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A dotted path into a token answer (``authed_user.access_token``): names, not expressions.
# Up to three alternatives separated by "|": the first one present is read (Slack nests a
# user token under authed_user in the code answer but not in the refresh answer).
_STEP = r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}"
_ANSWER_PATH = rf"^{_STEP}(\|{_STEP}){{0,2}}$"
# A provider's own error code (``bad_refresh_token``): shown to callers, so short and plain.
_ERROR_CODE = r"^[A-Za-z0-9_.-]{1,64}$"
# Request parameters the broker sets itself; extra parameters may not replace them.
RESERVED_AUTHORIZATION_PARAMS = frozenset(
    {"response_type", "client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method"}
)
RESERVED_TOKEN_PARAMS = frozenset(
    {"grant_type", "code", "redirect_uri", "code_verifier", "refresh_token", "client_id", "client_secret"}
)


class TokenResponsePaths(_Strict):
    """Where each value sits in a token answer, as a dotted path (``authed_user.access_token``).
    A path set to null is not read (``token_type: null``: the answer's type is not a token type,
    and the token is sent as Bearer). ``ok`` names a field that must be true (Slack)."""

    access_token: str = Field(default="access_token", pattern=_ANSWER_PATH)
    refresh_token: str | None = Field(default="refresh_token", pattern=_ANSWER_PATH)
    expires_in: str | None = Field(default="expires_in", pattern=_ANSWER_PATH)
    refresh_token_expires_in: str | None = Field(default="refresh_token_expires_in", pattern=_ANSWER_PATH)
    scope: str | None = Field(default="scope", pattern=_ANSWER_PATH)
    token_type: str | None = Field(default="token_type", pattern=_ANSWER_PATH)
    ok: str | None = Field(default=None, pattern=_ANSWER_PATH)


# Callback parameters a connection field may never keep: the code, the state and anything
# that is (or names) a token or the server's free text.
RESERVED_CALLBACK_PARAMS = frozenset(
    {
        "code",
        "state",
        "iss",
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "code_verifier",
        "client_secret",
        "error",
        "error_description",
        "error_uri",
    }
)
# Token answer names a connection field may never read: they are secrets.
_TOKEN_ANSWER_SECRETS = frozenset({"access_token", "refresh_token", "id_token", "code"})
_CONNECTION_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
MAX_CONNECTION_PARAMS = 8
MAX_CONNECTION_FIELDS = 16


class ConnectionParam(_Strict):
    """A per-connection value a caller gives BuildAuthorizationURL (``{"shop": "acme"}``) and
    that ``{name}`` placeholders in the endpoints take. See broker/endpoint_templates.py."""

    pattern: str = Field(min_length=3, max_length=512)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        endpoint_templates.check_pattern(value)
        return value


class ConnectionField(BaseModel):
    """Where a connection field's value comes from: the token answer (``path``), the callback's
    query (``param``, passed by the app in CompleteRequest.callback_params) or the connect
    request (``param``, a declared connection param)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_alias=True, validate_by_name=False, serialize_by_alias=True
    )

    source: Literal["token", "callback", "connect"] = Field(alias="from")
    path: str | None = Field(default=None, pattern=_ANSWER_PATH)
    param: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @model_validator(mode="after")
    def _where(self) -> ConnectionField:
        if self.source == "token":
            if self.path is None or self.param is not None:
                raise ValueError("from: token needs path (a dotted path into the token answer) and no param")
            for alternative in self.path.split("|"):
                if set(alternative.split(".")) & _TOKEN_ANSWER_SECRETS:
                    raise ValueError(
                        f"path {self.path!r} reads a token; a connection field is never a secret"
                    )
        else:
            if self.param is None or self.path is not None:
                raise ValueError(f"from: {self.source} needs param and no path")
            if self.source == "callback" and self.param in RESERVED_CALLBACK_PARAMS:
                raise ValueError(f"param {self.param!r} is the callback's own; it is never kept")
        return self


class AuthBrokerConfig(_Strict):
    """How the credential for one upstream is obtained."""

    mode: Mode
    # A preset from the provider catalogue (broker/providers/catalogue.yaml, or providers_file);
    # merged under this mapping before validation, so every key here overrides the preset's.
    provider: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    # Provider quirks, as data (see broker/providers/shaping.py).
    authorization_params: dict[str, str] = Field(default_factory=dict)
    token_params: dict[str, str] = Field(default_factory=dict)
    refresh_params: dict[str, str] = Field(default_factory=dict)
    refresh_endpoint: str | None = None
    token_request_format: Literal["form", "json"] = "form"
    # RFC 7009 section 2.1 posts a form; Intuit documents a JSON body.
    revocation_request_format: Literal["form", "json"] = "form"
    scope_separator: str = Field(default=" ", min_length=1, max_length=4)
    scope_param: str = Field(default="scope", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    pkce: Literal["s256", "none"] = "s256"
    token_response: TokenResponsePaths = TokenResponsePaths()
    reconnect_errors: tuple[str, ...] = ()
    default_expires_in: int | None = Field(default=None, ge=1, le=10 * 365 * 24 * 3600)
    # Per-connection endpoint placeholders and kept values (broker/endpoint_templates.py).
    connection_params: dict[str, ConnectionParam] = Field(default_factory=dict)
    connection_fields: dict[str, ConnectionField] = Field(default_factory=dict)
    # Optional when ``issuer`` is set: discovered from RFC 8414 metadata at start-up.
    token_endpoint: str | None = None
    authorization_endpoint: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    token_endpoint_auth_method: ClientAuthMethod = ClientAuthMethod.CLIENT_SECRET_BASIC
    scopes: tuple[str, ...] = ()
    resource: str | tuple[str, ...] | None = None
    audience: str | tuple[str, ...] | None = None
    subject_token_type: str = "urn:ietf:params:oauth:token-type:access_token"
    requested_token_type: str = "urn:ietf:params:oauth:token-type:access_token"
    redirect_uri: str | None = None
    header: str = "Authorization"
    header_format: str = "Bearer {token}"
    # RFC 8414 issuer: endpoints not named here are taken from its metadata document.
    issuer: str | None = None
    # RFC 7009 revocation endpoint (or discovered from the issuer's metadata).
    revocation_endpoint: str | None = None
    # RFC 9207: the callback must carry iss equal to ``issuer`` (or discovered from metadata).
    authorization_response_iss_parameter_supported: bool | None = None
    # token_exchange / entra_obo: keep the refresh token the exchange returns (sealed) and renew
    # the exchanged token with it once the user's own token is gone (long-running on-behalf-of).
    store_refresh_token: bool = False
    # private_key_jwt (RFC 7523 section 2.2): the client's RSA (RS256) or P-256 (ES256) private
    # key, PEM, read once at start-up; ``key_id`` is sent as the JWT's ``kid``.
    private_key_file: Path | None = None
    key_id: str | None = Field(default=None, pattern=r"^[\x21-\x7e]{1,256}$")
    # The key's X.509 certificate (PEM): its thumbprints go in the JWT header as x5t and
    # x5t#S256, which is how Microsoft Entra finds a certificate credential.
    certificate_file: Path | None = None
    # private_key_jwt with a JWT someone else signs (a Kubernetes projected service account
    # token for workload identity federation): re-read from this file on every request.
    client_assertion_file: Path | None = None
    # RFC 9126: push the authorization request first (None: as the issuer's metadata says in
    # require_pushed_authorization_requests, else off).
    pushed_authorization_requests: bool | None = None
    pushed_authorization_request_endpoint: str | None = None
    # A refresh token's fixed lifetime from issue, for providers that document one but do not
    # send it (Box: 60 days): dates each new refresh token in ListConnections when the answer
    # carries no lifetime of its own (broker/service/refresh.py refresh_token_expiry). Not an idle limit:
    # that is the upstream's refresh_token_idle_seconds.
    refresh_token_lifetime_seconds: StrictInt | None = Field(default=None, gt=0, le=10 * 365 * 86400)

    @field_validator(
        "token_endpoint",
        "authorization_endpoint",
        "redirect_uri",
        "issuer",
        "revocation_endpoint",
        "refresh_endpoint",
        "pushed_authorization_request_endpoint",
    )
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_url(value)
        return value

    @field_validator("connection_params", "connection_fields")
    @classmethod
    def _connection_names(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        limit = MAX_CONNECTION_PARAMS if info.field_name == "connection_params" else MAX_CONNECTION_FIELDS
        if len(value) > limit:
            raise ValueError(f"at most {limit} entries")
        for name in value:
            if not re.fullmatch(_CONNECTION_NAME, name):
                raise ValueError(f"{name[:40]!r} is not a name (a letter, then letters, digits, '_')")
        return value

    @model_validator(mode="after")
    def _templates(self) -> AuthBrokerConfig:
        """``{name}`` placeholders: declared, and only where a value cannot change the host."""
        declared = self.connection_params
        for key in ("authorization_endpoint", "token_endpoint", "refresh_endpoint", "revocation_endpoint"):
            template = getattr(self, key)
            if template is not None:
                try:
                    endpoint_templates.check_template(template, declared)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        for key in ("issuer", "redirect_uri"):
            value = getattr(self, key)
            if value is not None and ("{" in value or "}" in value):
                raise ValueError(f"{key}: may not have placeholders")
        for name, source in self.connection_fields.items():
            if source.source == "connect" and source.param not in declared:
                raise ValueError(
                    f"connection_fields.{name}: param {source.param!r} is not declared in connection_params"
                )
        return self

    def connection_patterns(self) -> dict[str, str]:
        """Each declared connection param's pattern, by name."""
        return {name: param.pattern for name, param in self.connection_params.items()}

    @field_validator("authorization_params")
    @classmethod
    def _authorization_params(cls, value: dict[str, str]) -> dict[str, str]:
        return _extra_params(value, RESERVED_AUTHORIZATION_PARAMS)

    @field_validator("token_params", "refresh_params")
    @classmethod
    def _token_params(cls, value: dict[str, str]) -> dict[str, str]:
        return _extra_params(value, RESERVED_TOKEN_PARAMS)

    @field_validator("reconnect_errors")
    @classmethod
    def _reconnect_errors(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for code in value:
            if not re.fullmatch(_ERROR_CODE, code):
                raise ValueError(
                    f"{code[:40]!r} is not an error code (1 to 64 letters, digits, '_', '.', '-')"
                )
        return value

    @field_validator("scope_separator")
    @classmethod
    def _scope_separator(cls, value: str) -> str:
        if not (value.isascii() and value.isprintable()):
            raise ValueError("must be printable ASCII, such as ' ' or ','")
        return value

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError("must be a header name (letters, digits, '-', '_')")
        return value

    @field_validator("header_format")
    @classmethod
    def _header_format(cls, value: str) -> str:
        if "{token}" not in value:
            raise ValueError("must contain {token}")
        return value

    def resources(self) -> tuple[str, ...]:
        return _as_tuple(self.resource)

    @property
    def refreshable(self) -> bool:
        """Whether credentials of this upstream hold a refresh token the broker uses:
        oauth_connect, or an exchange mode with ``store_refresh_token``."""
        return self.mode is Mode.OAUTH_CONNECT or self.store_refresh_token

    def audiences(self) -> tuple[str, ...]:
        return _as_tuple(self.audience)


class UpstreamConfig(_Strict):
    """A third-party API the broker obtains credentials for."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    url: str
    auth_broker: AuthBrokerConfig
    # Keep-alive for providers that revoke a refresh token left unused this long: the background
    # refresher (broker/refresher.py) refreshes before that, even if nobody calls Resolve.
    refresh_token_idle_seconds: int | None = Field(default=None, ge=60, le=10 * 365 * 86400)

    @model_validator(mode="after")
    def _url_template(self) -> UpstreamConfig:
        try:
            endpoint_templates.check_template(self.url, self.auth_broker.connection_params)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        return self

    @cached_property
    def key(self) -> str:  # looked up on every Resolve: hash once
        return upstream_key(self.name, self.url)


class StoreConfig(_Strict):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: Path = Path("credential-broker-data/broker.db")
    # PostgreSQL: exactly one of dsn, dsn_file, dsn_env; the password may also come separately.
    dsn: SecretStr | None = None
    dsn_file: Path | None = None
    dsn_env: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    pool_size: int = Field(default=10, ge=1, le=200)
    # Bound on waiting for another process's refresh lease on the same credential (then the
    # waiter re-reads once more and fails UNAVAILABLE); also capped by the lease itself.
    lock_timeout_seconds: float = Field(default=15.0, gt=0, le=300)


class Pkcs11RootKeyConfig(_Strict):
    """A root key on a PKCS#11 token (an HSM): the KEKs are wrapped with CKM_AES_KEY_WRAP_KWP, or
    AES-GCM where the token lacks it. The PIN comes from exactly one of pin_file, pin_env."""

    type: Literal["pkcs11"]
    module: Path
    token_label: str = Field(min_length=1, max_length=32)
    key_label: str = Field(min_length=1, max_length=128)
    pin_file: Path | None = None
    pin_env: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_pin_source(self) -> Pkcs11RootKeyConfig:
        if (self.pin_file is None) == (self.pin_env is None):
            raise ValueError("set exactly one of pin_file, pin_env")
        return self


class AwsKmsRootKeyConfig(_Strict):
    """A root key in AWS KMS (Encrypt/Decrypt with an encryption context binding each KEK id);
    credentials come from the standard AWS chain (environment, web identity, instance role)."""

    type: Literal["aws_kms"]
    key_id: str = Field(min_length=1, max_length=2048)
    region: str = Field(pattern=r"^[a-z0-9-]{1,32}$")
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")


class KeyringConfig(_Strict):
    file: Path
    # The root key that wraps every KEK in the file (broker/crypto/wrapped.py); None: a plain file.
    wrapped_by: Annotated[Pkcs11RootKeyConfig | AwsKmsRootKeyConfig, Field(discriminator="type")] | None = (
        None
    )
    # At start-up, how long to keep retrying (with backoff) a root key source that cannot be reached.
    unwrap_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)


class LogConfig(_Strict):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class HttpConfig(_Strict):
    """Outbound calls to authorization servers."""

    # Bounds each token request as a whole: the wait for a request slot, connect, send and
    # every byte of the answer.
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    max_response_bytes: int = Field(default=1 << 20, ge=1024, le=16 << 20)
    # Per upstream, per process: token requests in flight at once; more wait for a slot within
    # their deadline. A refresh is one short request per credential per token lifetime, so 10
    # slots carry hundreds of refreshes a second at normal latency, while a hung upstream can
    # hold no more than 10 connections (each token endpoint host also has its own pool).
    max_concurrent_requests: int = Field(default=10, ge=1, le=1000)
    # A PEM bundle of CA certificates trusted for outbound HTTPS in addition to the default
    # ones (a self-hosted authorization server or identity provider on a private CA).
    ca_file: Path | None = None


# Asymmetric JWS algorithms only (RFC 7518 section 3, RFC 8037): "none" and the HMAC family
# are refused, so a public key can never be used as an HMAC secret (algorithm confusion).
JWS_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class IdentityConfig(_Strict):
    """How user tokens are verified: when set, every RPC that acts for a user needs one."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    user_claim: str = "sub"
    leeway_seconds: int = Field(default=60, ge=0, le=600)
    jwks_min_refetch_seconds: int = Field(default=60, ge=1, le=86400)

    @field_validator("issuer", "jwks_uri")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_url(value)
        return value

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(value):
            raise ValueError("needs at least one non-empty audience")
        return value

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one algorithm")
        for alg in value:
            if alg not in JWS_ALGORITHMS:
                raise ValueError(f"{alg!r} is not allowed; choose from {', '.join(JWS_ALGORITHMS)}")
        return value

    @field_validator("user_claim")
    @classmethod
    def _claim(cls, value: str) -> str:
        if not value:
            raise ValueError("must name a claim")
        return value


class PolicyRuleConfig(_Strict):
    """One rule: who (user ids and/or claims of the verified token) may resolve which upstreams."""

    effect: Literal["allow", "deny"] = "allow"
    upstreams: tuple[str, ...] = ("*",)
    users: tuple[str, ...] = ("*",)
    claims: dict[str, str | tuple[str, ...]] = Field(default_factory=dict)
    reason: str | None = Field(default=None, max_length=256)


class PolicyConfig(_Strict):
    """The Resolve policy: allow-all (no key), a rule list, or an entry-point plug-in."""

    rules: tuple[PolicyRuleConfig, ...] = ()
    default: Literal["allow", "deny"] = "deny"
    entry_point: str | None = None


class ListenerConfig(_Strict):
    """One listen address; a plain string in ``listen`` is the same with the defaults."""

    address: str
    # Octal permission bits for a unix socket, e.g. "0660".
    socket_mode: str = "0660"

    @field_validator("socket_mode")
    @classmethod
    def _socket_mode(cls, value: str) -> str:
        if not (len(value) in (3, 4) and all(c in "01234567" for c in value)):
            raise ValueError("must be octal permission bits such as 0660")
        return value

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def is_unix(self) -> bool:
        return self.address.startswith("unix://")


class TlsConfig(_Strict):
    """TLS for TCP listeners; with ``client_ca_file`` callers must present a certificate (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class CallerConfig(_Strict):
    """A named caller and what it may do. Identified by a token (sent as ``authorization:
    Bearer <token>`` and stored here only as its SHA-256) and/or a client-certificate identity
    (a SAN URI such as a SPIFFE ID, or a SAN DNS name)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    cert_identities: tuple[str, ...] = ()
    # Upstream names, or "*" for every upstream.
    upstreams: tuple[str, ...] = ("*",)
    # RPC names (e.g. "Resolve"), or "*" for every RPC.
    methods: tuple[str, ...] = ("*",)


class AuditConfig(_Strict):
    """The JSON-lines audit stream."""

    output: Literal["stdout", "file", "none"] = "stdout"
    path: Path | None = None
    max_bytes: int = Field(default=50 << 20, ge=1024)
    backup_count: int = Field(default=5, ge=0, le=100)


class BackgroundRefreshConfig(_Strict):
    """Refresh ahead of expiry without waiting for a Resolve (broker/refresher.py).

    ``ahead_seconds``: a credential is refreshed once its access token has this long left (at
    most half its lifetime, so short-lived tokens are not refreshed right after each refresh),
    minus up to 20% jitter; 300 covers the common 1 hour tokens with room for a slow provider
    and retries, and is well above ``refresh_window_seconds`` (60), so Resolve seldom has to
    wait on a provider. ``max_concurrent``: background refreshes in flight per upstream per
    process, further capped at half of ``http.max_concurrent_requests`` so Resolve always
    keeps request slots. ``interval_seconds``: how often each process looks for due
    credentials (one bounded, indexed query per tick).

    ``separate_process``: ``broker serve`` runs the refresher in a child process of its own
    (broker/refresh_process.py), so refresh work (HTTP, JSON, sealing, store writes) never holds
    the event loop or the interpreter lock that Resolve is answered on. Off: the refresher runs
    as a task in the serving process. ``process_scheduling`` sets that child's CPU priority:
    ``idle`` (the default) puts it in Linux's idle scheduling class (SCHED_IDLE), so it runs on
    CPU time that normal-priority work (Resolve, the database) leaves over and a waking Resolve
    takes the core from it at once; ``nice`` only lowers its nice value by ``process_nice``,
    which still lets it take a share of a busy core (measured in
    benchmarks/background_refresh.py). Where SCHED_IDLE is unavailable, ``idle`` falls back
    to ``nice``, with a warning."""

    enabled: bool = True
    ahead_seconds: int = Field(default=300, ge=1, le=86400)
    max_concurrent: int = Field(default=4, ge=1, le=1000)
    interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    separate_process: bool = True
    process_nice: int = Field(default=10, ge=0, le=19)
    process_scheduling: Literal["idle", "nice"] = "idle"


class RetentionConfig(_Strict):
    """What the reaper deletes (broker/retention.py), every ``interval_seconds``.

    ``needs_reauth_seconds``: a credential that has needed reconnecting for longer than this is
    deleted (its refresh token is dead; the user connects again when next asked). 0, the
    default, keeps them: deleting one loses the "needs_reauth" answer that tells the app to
    prompt the user, and nothing can undo it, so the operator opts in. ``dry_run``: log and
    audit what would be deleted, delete nothing (expired connect flows are still purged: they
    cannot be completed, and each new flow purges them too)."""

    needs_reauth_seconds: int = Field(default=0, ge=0, le=10 * 365 * 86400)
    dry_run: bool = False
    interval_seconds: float = Field(default=300.0, gt=0, le=86400)


class EventsConfig(_Strict):
    """How long connection events are kept (WatchConnections' resume window, broker/events.py).

    Events older than ``retention_seconds`` (default 7 days: a watcher down over a weekend
    still resumes) are deleted, and beyond the newest ``max_events`` (default 1,000,000, about
    100 MB) even younger ones. A watcher asking to resume below what was deleted is told to
    resynchronise with ListConnections (WATCH_RESYNC_REQUIRED)."""

    retention_seconds: int = Field(default=7 * 86400, ge=60, le=366 * 86400)
    max_events: int = Field(default=1_000_000, ge=1, le=1_000_000_000)


class MetricsConfig(_Strict):
    """The Prometheus endpoint, off unless ``listen`` is set (host:port, served at /metrics)."""

    listen: str | None = None


class ConnectConfig(_Strict):
    """Hosted connect (broker/connect/): the broker's own HTTP listener for the browser side of
    a connect flow. ``public_url`` is where browsers reach it (TLS may end at a proxy in front of
    ``listen``); each oauth_connect upstream's redirect URI is ``{public_url}/callback``. After
    the callback the browser goes to ``return_to`` with ``upstream``, ``status`` and ``reason``."""

    listen: str
    public_url: str
    return_to: str
    cookie_name: str = Field(default="credential_broker_connect", pattern=r"^[A-Za-z0-9_-]{1,64}$")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        check_listen_address(value)
        if value.startswith("unix://"):
            raise ValueError("must be host:port")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        _check_url(value)
        if urlsplit(value).query or value.endswith("?"):
            raise ValueError("must not have a query")
        return value.rstrip("/")

    @field_validator("return_to")
    @classmethod
    def _return_to(cls, value: str) -> str:
        _check_url(value)
        return value

    @property
    def callback_url(self) -> str:
        return self.public_url + "/callback"

    def start_url(self, reference: str) -> str:
        """The /start link of a flow's one-time reference."""
        return f"{self.public_url}/start?" + urlencode({"flow": reference})


class BrokerConfig(_Strict):
    """The whole configuration document."""

    listen: tuple[str | ListenerConfig, ...] = (DEFAULT_LISTEN,)
    health_listen: str | None = None
    workers: int = Field(default=1, ge=1, le=64)
    # The asyncio event loop of every broker process (broker/event_loop.py).
    event_loop: EventLoopKind = "uvloop"
    tls: TlsConfig | None = None
    # The SSRF guard header x-credential-broker-request: true, required on "tcp" listeners
    # (the default), on every listener ("always") or never. Never for the health service.
    require_request_header: Literal["tcp", "always", "never"] = "tcp"
    callers: tuple[CallerConfig, ...] = ()
    audit: AuditConfig = AuditConfig()
    metrics: MetricsConfig = MetricsConfig()
    # OpenTelemetry traces; off unless enabled here or by OTEL_* variables (broker/tracing/config.py).
    tracing: TracingConfig = TracingConfig()
    store: StoreConfig = StoreConfig()
    keyring: KeyringConfig
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    flow_ttl_seconds: int = Field(default=600, ge=30, le=3600)
    max_pending_flows: int = Field(default=5, ge=1, le=100)
    # Live pending flows of all users together; past it a new flow is refused (never evicted).
    max_pending_flows_total: int = Field(default=100_000, ge=1, le=100_000_000)
    # How often expired pending flows are deleted (and a SQLite file's freed pages given back).
    flow_purge_interval_seconds: float = Field(default=60.0, gt=0, le=3600)
    refresh_window_seconds: int = Field(default=60, ge=0, le=3600)
    # A credential refreshed (or connected) less than this long ago is not refreshed again just
    # because a caller's min_valid_seconds asks for more than its token has: a new token would
    # not have more. The caller gets it with its true expires_at. See BrokerService.resolve.
    min_refresh_interval_seconds: int = Field(default=30, ge=0, le=3600)
    # How long Resolve may answer from memory without reading the store again. Any write made
    # by this process drops the memory at once; this bounds how late a change made by another
    # process (a replica's Disconnect, a tampered row) is seen. 0 reads the store every time.
    read_cache_seconds: float = Field(default=1.0, ge=0, le=60)
    # More provider presets (or replacements for built-in ones), in the catalogue's schema.
    providers_file: Path | None = None
    background_refresh: BackgroundRefreshConfig = BackgroundRefreshConfig()
    retention: RetentionConfig = RetentionConfig()
    events: EventsConfig = EventsConfig()
    upstreams: tuple[UpstreamConfig, ...] = ()
    identity: IdentityConfig | None = None
    policy: PolicyConfig | None = None
    connect: ConnectConfig | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: tuple[str | ListenerConfig, ...]) -> tuple[str | ListenerConfig, ...]:
        if not value:
            raise ValueError("needs at least one address")
        for entry in value:
            check_listen_address(entry if isinstance(entry, str) else entry.address)
        return value

    def listeners(self) -> tuple[ListenerConfig, ...]:
        """``listen`` with plain strings turned into ListenerConfig defaults."""
        return tuple(ListenerConfig(address=e) if isinstance(e, str) else e for e in self.listen)

    def upstream(self, name: str) -> UpstreamConfig | None:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None


def _extra_params(value: dict[str, str], reserved: frozenset[str]) -> dict[str, str]:
    """Extra request parameters: plain names, printable values, and none the broker sets itself
    (so a preset or config can never replace state, the PKCE challenge or the redirect URI)."""
    for key, item in value.items():
        if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]{1,64}", key):
            raise ValueError(f"{key[:40]!r} is not a parameter name")
        if key in reserved:
            raise ValueError(f"{key!r} is set by the broker and cannot be overridden")
        if len(item) > 2048 or not item.isprintable():
            raise ValueError(f"{key}: the value must be printable text of at most 2048 characters")
    return value


def check_listen_address(address: str) -> None:
    """Accept ``unix:///abs/path`` or ``host:port``; raise ValueError otherwise."""
    if address.startswith("unix://"):
        if not address.startswith("unix:///") or len(address) <= len("unix:///"):
            raise ValueError(f"{address!r}: a unix address is unix:///absolute/path")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: expected host:port or unix:///path")


def listen_host(address: str) -> str | None:
    """The host of a ``host:port`` address (brackets dropped); None for a unix address."""
    if address.startswith("unix://"):
        return None
    return address.rpartition(":")[0].strip("[]")


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else value


def is_loopback(host: str) -> bool:
    return _is_loopback(host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint_url(value: str) -> None:
    """An endpoint URL rule shared with discovery: https, or http on loopback; no fragment."""
    _check_url(value)


def _check_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must use https (plain http is allowed only for loopback hosts)")
    if parts.fragment:
        raise ValueError("must not have a fragment")


def _loc(parts: Sequence[int | str]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format(err: ValidationError) -> str:
    """Every validation error, in plain words (see broker/config_errors.py)."""
    return format_errors(validation_problems(err, BrokerConfig))


def _resolve_secret(
    auth: AuthBrokerConfig, where: str, environ: Mapping[str, str], base_dir: Path
) -> AuthBrokerConfig:
    sources = [k for k in ("client_secret", "client_secret_file", "client_secret_env") if getattr(auth, k)]
    if len(sources) > 1:
        raise ConfigError(f"{where}: set only one of client_secret, client_secret_file, client_secret_env")
    secret: str | None = None
    if auth.client_secret_file is not None:
        path = (
            auth.client_secret_file
            if auth.client_secret_file.is_absolute()
            else base_dir / auth.client_secret_file
        )
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.client_secret_file: cannot read {path} ({exc.strerror})") from None
    elif auth.client_secret_env is not None:
        if auth.client_secret_env not in environ:
            raise ConfigError(
                f"{where}.client_secret_env: environment variable {auth.client_secret_env} is not set"
            )
        secret = environ[auth.client_secret_env]
    if secret is None:
        return auth
    return auth.model_copy(update={"client_secret": SecretStr(secret)})


def _read_secret_file(path: Path, base_dir: Path, where: str) -> str:
    path = path if path.is_absolute() else base_dir / path
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None


def _read_secret_env(name: str, environ: Mapping[str, str], where: str) -> str:
    if name not in environ:
        raise ConfigError(f"{where}: environment variable {name} is not set")
    return environ[name]


def _resolve_store(store: StoreConfig, environ: Mapping[str, str], base_dir: Path) -> StoreConfig:
    """Read the PostgreSQL DSN (and optionally its password) from where the config says."""
    sources = [k for k in ("dsn", "dsn_file", "dsn_env") if getattr(store, k) is not None]
    passwords = [k for k in ("password_file", "password_env") if getattr(store, k) is not None]
    if store.backend == "sqlite":
        if sources or passwords:
            raise ConfigError(f"store.{(sources + passwords)[0]}: only for backend postgres")
        return store
    if len(sources) != 1:
        raise ConfigError("store.dsn: backend postgres needs exactly one of dsn, dsn_file, dsn_env")
    if len(passwords) > 1:
        raise ConfigError("store.password_file: set only one of password_file, password_env")
    if store.dsn_file is not None:
        dsn = _read_secret_file(store.dsn_file, base_dir, "store.dsn_file")
    elif store.dsn_env is not None:
        dsn = _read_secret_env(store.dsn_env, environ, "store.dsn_env")
    else:
        assert store.dsn is not None
        dsn = store.dsn.get_secret_value()
    if not dsn:
        raise ConfigError(f"store.{sources[0]}: the DSN is empty")
    password: str | None = None
    if store.password_file is not None:
        password = _read_secret_file(store.password_file, base_dir, "store.password_file")
    elif store.password_env is not None:
        password = _read_secret_env(store.password_env, environ, "store.password_env")
    from psycopg.conninfo import conninfo_to_dict, make_conninfo  # only for backend postgres

    try:
        conninfo_to_dict(dsn)
        if password is not None:
            dsn = make_conninfo(dsn, password=password)
    except Exception:  # psycopg.ProgrammingError; its text may quote the DSN
        raise ConfigError(f"store.{sources[0]}: not a valid PostgreSQL connection string") from None
    return store.model_copy(update={"dsn": SecretStr(dsn)})


def _hosted_redirect_uri(
    index: int, auth: AuthBrokerConfig, connect: ConnectConfig | None
) -> AuthBrokerConfig:
    """With hosted connect on, an oauth_connect upstream's redirect URI is the broker's own
    callback: taken as that when left out, refused when it names anything else."""
    if connect is None or auth.mode is not Mode.OAUTH_CONNECT:
        return auth
    if auth.redirect_uri is None:
        return auth.model_copy(update={"redirect_uri": connect.callback_url})
    if auth.redirect_uri != connect.callback_url:
        raise ConfigError(
            f"upstreams[{index}].auth_broker.redirect_uri: must be {connect.callback_url} "
            "(connect.public_url + /callback) when hosted connect is on, or left out"
        )
    return auth


def _check_upstream(index: int, upstream: UpstreamConfig) -> None:
    where = f"upstreams[{index}].auth_broker"
    auth = upstream.auth_broker
    # private_key_jwt authenticates with a key or an assertion file (_check_client_auth).
    needs_secret = auth.token_endpoint_auth_method not in (
        ClientAuthMethod.NONE,
        ClientAuthMethod.PRIVATE_KEY_JWT,
    )
    if auth.token_endpoint is None and auth.issuer is None:
        raise ConfigError(f"{where}.token_endpoint: required (or set issuer to discover it)")
    if auth.mode is Mode.OAUTH_CONNECT:
        for key in ("authorization_endpoint", "client_id", "redirect_uri"):
            if key == "authorization_endpoint" and auth.issuer is not None:
                continue  # discovered
            if not getattr(auth, key):
                raise ConfigError(f"{where}.{key}: required for mode oauth_connect")
    if auth.client_id is None and auth.mode is not Mode.OAUTH_CONNECT and needs_secret:
        raise ConfigError(f"{where}.client_id: required with {auth.token_endpoint_auth_method.value}")
    if auth.store_refresh_token and auth.mode is Mode.OAUTH_CONNECT:
        raise ConfigError(
            f"{where}.store_refresh_token: only for mode token_exchange or entra_obo "
            "(oauth_connect always keeps its refresh token)"
        )
    if auth.mode is not Mode.OAUTH_CONNECT and (auth.connection_params or auth.connection_fields):
        raise ConfigError(f"{where}.connection_params: only for mode oauth_connect")
    if auth.mode is Mode.ENTRA_OBO and not auth.scopes:
        raise ConfigError(
            f"{where}.scopes: required for mode entra_obo (e.g. https://graph.microsoft.com/.default)"
        )
    _check_client_auth(where, auth)
    if needs_secret and auth.client_secret is None:
        raise ConfigError(
            f"{where}.client_secret: required with token_endpoint_auth_method "
            f"{auth.token_endpoint_auth_method.value} (or set it to none for a public client)"
        )


def _check_client_auth(where: str, auth: AuthBrokerConfig) -> None:
    """private_key_jwt needs exactly one of private_key_file (the broker signs) and
    client_assertion_file (someone else signs), and no client secret; those keys need it. PAR
    needs an endpoint, or an issuer whose metadata may name one."""
    files = [k for k in ("private_key_file", "client_assertion_file") if getattr(auth, k) is not None]
    if auth.token_endpoint_auth_method is ClientAuthMethod.PRIVATE_KEY_JWT:
        if len(files) != 1:
            raise ConfigError(
                f"{where}.private_key_file: token_endpoint_auth_method private_key_jwt needs exactly "
                "one of private_key_file (the broker signs) or client_assertion_file (a JWT re-read "
                "on every request)"
            )
        if auth.client_id is None:
            raise ConfigError(f"{where}.client_id: required with private_key_jwt (the JWT's iss and sub)")
        if auth.client_secret is not None:
            raise ConfigError(
                f"{where}.client_secret: not used with private_key_jwt; remove client_secret, "
                "client_secret_file or client_secret_env"
            )
        for key in ("key_id", "certificate_file"):
            if getattr(auth, key) is not None and auth.private_key_file is None:
                raise ConfigError(f"{where}.{key}: only with private_key_file")
    elif files or auth.key_id is not None or auth.certificate_file is not None:
        key = files[0] if files else ("key_id" if auth.key_id is not None else "certificate_file")
        raise ConfigError(f"{where}.{key}: set token_endpoint_auth_method: private_key_jwt to use it")
    if (
        auth.pushed_authorization_requests
        and auth.pushed_authorization_request_endpoint is None
        and auth.issuer is None
    ):
        raise ConfigError(
            f"{where}.pushed_authorization_request_endpoint: required with pushed_authorization_requests "
            "(or set issuer to discover it)"
        )


def _root_client_files(auth: AuthBrokerConfig, base_dir: Path) -> AuthBrokerConfig:
    """private_key_file and client_assertion_file taken from ``base_dir`` when relative."""
    update = {
        key: base_dir / path
        for key in ("private_key_file", "client_assertion_file", "certificate_file")
        if (path := getattr(auth, key)) is not None and not path.is_absolute()
    }
    return auth.model_copy(update=update) if update else auth


class ProviderEntry(_Strict):
    """One preset of the provider catalogue: ``auth_broker`` keys validated by the same schema as
    an upstream's (a preset sets no client id or secret), the provider's documentation it was
    written from, and what a user must set up on the provider's side."""

    title: str = Field(min_length=1, max_length=120)
    docs: tuple[str, ...] = Field(min_length=1)
    setup: str = ""
    auth_broker: AuthBrokerConfig

    @field_validator("docs")
    @classmethod
    def _docs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            _check_url(url)
        return value

    @field_validator("auth_broker")
    @classmethod
    def _no_client(cls, value: AuthBrokerConfig) -> AuthBrokerConfig:
        for key in (
            "client_id",
            "client_secret",
            "client_secret_file",
            "client_secret_env",
            "provider",
            "private_key_file",
            "key_id",
            "client_assertion_file",
            "certificate_file",
        ):
            if getattr(value, key) is not None:
                raise ValueError(f"a preset may not set {key}; it belongs in the upstream's config")
        return value


def provider_catalogue(providers_file: Path | None = None) -> dict[str, ProviderEntry]:
    """The built-in presets, plus (replacing same-named ones) those of ``providers_file``. Each
    entry is validated; a bad one is a ConfigError naming the file and the entry."""
    from broker.providers import presets  # data files only; imports nothing of the broker

    raw = {"built-in": presets.builtin_entries()}
    if providers_file is not None:
        raw[str(providers_file)] = presets.read_entries(providers_file)
    out: dict[str, ProviderEntry] = {}
    problems: list[str] = []
    for source, entries in raw.items():
        for name, entry in entries.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name):
                problems.append(
                    f"{source}: provider name {name[:40]!r} must be lowercase letters, digits, '-', '_'"
                )
                continue
            try:
                out[name] = ProviderEntry.model_validate(entry)
            except ValidationError as exc:
                problems += [f"{source}: {name}.{line}" for line in validation_problems(exc, ProviderEntry)]
    if problems:
        raise ConfigError(format_errors(problems))
    return out


def _apply_providers(document: Mapping[str, Any], base_dir: Path) -> Mapping[str, Any]:
    """Each upstream's ``auth_broker`` with its ``provider`` preset merged under it (the config's
    keys win; mapping knobs merge key by key, and a null value there drops the preset's key)."""
    upstreams = document.get("upstreams")
    if not isinstance(upstreams, list | tuple):
        upstreams = []
    uses_presets = any(
        isinstance(u, dict) and isinstance(u.get("auth_broker"), dict) and "provider" in u["auth_broker"]
        for u in upstreams
    )
    if not uses_presets and not document.get("providers_file"):
        return document  # the catalogue is read only when something uses it
    from broker.providers import presets

    file = document.get("providers_file")
    path = None
    if isinstance(file, str) and file:
        path = Path(file) if Path(file).is_absolute() else base_dir / file
    catalogue = provider_catalogue(path)  # a providers_file is checked even when unused
    if not uses_presets:
        return document
    merged: list[Any] = []
    problems: list[str] = []
    for index, upstream in enumerate(upstreams):
        auth = upstream.get("auth_broker") if isinstance(upstream, dict) else None
        name = auth.get("provider") if isinstance(auth, dict) else None
        if not isinstance(name, str):
            merged.append(upstream)
            continue
        entry = catalogue.get(name)
        if entry is None:
            close = presets.closest(name, sorted(catalogue))
            hint = f"; did you mean {close}?" if close else ""
            problems.append(
                f"upstreams[{index}].auth_broker.provider: unknown provider {name[:64]!r}{hint} "
                "(credential-broker providers list)"
            )
            merged.append(upstream)
            continue
        preset = entry.auth_broker.model_dump(mode="json", exclude_unset=True)
        assert isinstance(auth, dict)  # it has a provider key
        merged.append({**upstream, "auth_broker": presets.merge(preset, auth)})
    if problems:
        raise ConfigError(format_errors(problems))
    return {**document, "upstreams": merged}


def load_config(document: Mapping[str, Any], *, environ: Mapping[str, str], base_dir: Path) -> BrokerConfig:
    """Validate a parsed config document. Relative paths are taken from ``base_dir``."""
    document = _apply_providers(document, base_dir)
    try:
        config = BrokerConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
    upstreams = []
    seen: set[str] = set()
    # Each check below raises at its first problem; problems in different parts are all listed.
    problems: list[str] = []
    for index, upstream in enumerate(config.upstreams):
        if upstream.name in seen:
            problems.append(f"upstreams[{index}].name: duplicate upstream {upstream.name!r}")
            continue
        seen.add(upstream.name)
        try:
            auth = _resolve_secret(upstream.auth_broker, f"upstreams[{index}].auth_broker", environ, base_dir)
            auth = _hosted_redirect_uri(index, auth, config.connect)
            auth = _root_client_files(auth, base_dir)
            upstream = upstream.model_copy(update={"auth_broker": auth})
            _check_upstream(index, upstream)
        except ConfigError as exc:
            problems.append(exc.message)
        upstreams.append(upstream)

    def rooted(path: Path) -> Path:
        return path if path.is_absolute() else base_dir / path

    store = config.store
    try:
        store = _resolve_store(config.store, environ, base_dir)
    except ConfigError as exc:
        problems.append(exc.message)
    try:
        _check_operations(config)
    except ConfigError as exc:
        problems.append(exc.message)
    tracing = config.tracing
    try:
        tracing = resolve_tracing(config.tracing, environ)
    except ConfigError as exc:
        problems.append(exc.message)
    http = config.http
    if http.ca_file is not None:
        ca_file = rooted(http.ca_file)
        http = http.model_copy(update={"ca_file": ca_file})
        try:
            # Read now, so `config check` and start-up both stop on a file that cannot be used.
            load_ca_file(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca_file)
        except ConfigError as exc:
            problems.append(exc.message)
    if problems:
        raise ConfigError(format_errors(problems))
    tls = config.tls
    if tls is not None:
        tls = tls.model_copy(
            update={
                "cert_file": rooted(tls.cert_file),
                "key_file": rooted(tls.key_file),
                "client_ca_file": rooted(tls.client_ca_file) if tls.client_ca_file else None,
            }
        )
    audit = config.audit
    if audit.path is not None:
        audit = audit.model_copy(update={"path": rooted(audit.path)})
    return config.model_copy(
        update={
            "tls": tls,
            "audit": audit,
            "http": http,
            "tracing": tracing,
            "upstreams": tuple(upstreams),
            "store": store.model_copy(update={"path": rooted(store.path)}),
            "keyring": _rooted_keyring(config.keyring, rooted),
            "providers_file": rooted(config.providers_file) if config.providers_file else None,
        }
    )


def load_ca_file(context: ssl.SSLContext, path: Path) -> None:
    """Add the CA certificates of the PEM file ``path`` (``http.ca_file``) to ``context``'s trust,
    or raise a one-line ConfigError saying what the file must be."""
    what = "it must be a readable PEM file of the CA certificates to trust for outbound HTTPS"
    try:
        path.read_bytes()  # a clear reason (missing, a folder, no permission) before OpenSSL's
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise ConfigError(
            f"http.ca_file: {path} holds no PEM CA certificate (-----BEGIN CERTIFICATE-----); {what}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"http.ca_file: cannot read {path} ({exc.strerror or exc}); {what}") from None


def _rooted_keyring(keyring: KeyringConfig, rooted: Callable[[Path], Path]) -> KeyringConfig:
    """The keyring section with its file (and a PKCS#11 PIN file) taken from the config's folder."""
    wrapped_by = keyring.wrapped_by
    if isinstance(wrapped_by, Pkcs11RootKeyConfig) and wrapped_by.pin_file is not None:
        wrapped_by = wrapped_by.model_copy(update={"pin_file": rooted(wrapped_by.pin_file)})
    return keyring.model_copy(update={"file": rooted(keyring.file), "wrapped_by": wrapped_by})


def _check_operations(config: BrokerConfig) -> None:
    """Listener, caller, audit and metrics rules that span several fields."""
    check_listener_security(config)
    if config.health_listen is not None:
        check_listen_address_or_error("health_listen", config.health_listen)
    if config.metrics.listen is not None:
        check_listen_address_or_error("metrics.listen", config.metrics.listen)
        if config.metrics.listen.startswith("unix://"):
            raise ConfigError("metrics.listen: must be host:port")
    if config.audit.output == "file" and config.audit.path is None:
        raise ConfigError("audit.path: required with output file")
    names: set[str] = set()
    for index, caller in enumerate(config.callers):
        if caller.name in names:
            raise ConfigError(f"callers[{index}].name: duplicate caller {caller.name!r}")
        names.add(caller.name)
        if caller.token_sha256 is None and not caller.cert_identities:
            raise ConfigError(f"callers[{index}]: set token_sha256 or cert_identities")
        if caller.cert_identities and (config.tls is None or config.tls.client_ca_file is None):
            raise ConfigError(f"callers[{index}].cert_identities: needs tls.client_ca_file (mutual TLS)")
        for upstream in caller.upstreams:
            if upstream != "*" and config.upstream(upstream) is None:
                raise ConfigError(f"callers[{index}].upstreams: {upstream!r} is not a configured upstream")


def check_listener_security(config: BrokerConfig) -> None:
    """A TCP listener on a non-loopback address needs TLS and caller authentication.

    Caller authentication is mutual TLS (``tls.client_ca_file``) or configured ``callers``
    (each call then carries a known token or certificate). Anyone who can reach the address
    could otherwise ask for any user's credential. Checked again after ``serve --listen``."""
    authenticated = bool(config.callers) or (config.tls is not None and config.tls.client_ca_file is not None)
    for index, listener in enumerate(config.listeners()):
        host = listen_host(listener.address)
        if host is None or _is_loopback(host):
            continue
        if config.tls is None:
            raise ConfigError(
                f"listen[{index}]: {listener.address!r} is not a loopback address; set tls to listen on "
                "it, with caller authentication (tls.client_ca_file or callers), or use a unix socket "
                "or a loopback address"
            )
        if not authenticated:
            raise ConfigError(
                f"listen[{index}]: {listener.address!r} is not a loopback address; tls alone lets any "
                "client in: set tls.client_ca_file (mutual TLS) or callers (caller tokens) to listen on it"
            )


def check_listen_address_or_error(where: str, address: str) -> None:
    try:
        check_listen_address(address)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config_file(path: Path, *, environ: Mapping[str, str]) -> BrokerConfig:
    """Read and validate a YAML config file."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML{_yaml_where(exc)}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the document must be a mapping")
    return load_config(document, environ=environ, base_dir=path.parent.resolve())


def _yaml_where(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: reason`` from a YAML error (1-based, as editors count)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}" if problem else where
