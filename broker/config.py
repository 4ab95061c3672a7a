"""Configuration: a YAML document validated at start-up.

The environment is a parameter (``environ``), not a global, so tests pass their own. Every
error names the field it is about, e.g. ``upstreams[0].auth_broker.token_endpoint: required``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from broker.errors import ConfigError
from broker.models import upstream_key

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthBrokerConfig(_Strict):
    """How the credential for one upstream is obtained."""

    mode: Mode
    token_endpoint: str
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

    @field_validator("token_endpoint", "authorization_endpoint", "redirect_uri")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_url(value)
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

    def audiences(self) -> tuple[str, ...]:
        return _as_tuple(self.audience)


class UpstreamConfig(_Strict):
    """A third-party API the broker obtains credentials for."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    url: str
    auth_broker: AuthBrokerConfig

    @property
    def key(self) -> str:
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
    # How long a refresh waits for another process's refresh of the same credential.
    lock_timeout_seconds: float = Field(default=15.0, gt=0, le=300)


class KeyringConfig(_Strict):
    file: Path


class LogConfig(_Strict):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class HttpConfig(_Strict):
    """Outbound calls to authorization servers."""

    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    max_response_bytes: int = Field(default=1 << 20, ge=1024, le=16 << 20)


class BrokerConfig(_Strict):
    """The whole configuration document."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    health_listen: str | None = None
    workers: int = Field(default=1, ge=1, le=64)
    store: StoreConfig = StoreConfig()
    keyring: KeyringConfig
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    flow_ttl_seconds: int = Field(default=600, ge=30, le=3600)
    max_pending_flows: int = Field(default=5, ge=1, le=100)
    refresh_window_seconds: int = Field(default=60, ge=0, le=3600)
    upstreams: tuple[UpstreamConfig, ...] = ()

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one address")
        for address in value:
            check_listen_address(address)
        return value

    def upstream(self, name: str) -> UpstreamConfig | None:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None


def check_listen_address(address: str) -> None:
    """Accept ``unix:///abs/path`` or ``host:port``; raise ValueError otherwise."""
    if address.startswith("unix://"):
        if not address.startswith("unix:///") or len(address) <= len("unix:///"):
            raise ValueError(f"{address!r}: a unix address is unix:///absolute/path")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: expected host:port or unix:///path")


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    lines = []
    for e in err.errors():
        # Literal/enum unions put the member name in loc; keep the field path only.
        loc = [
            p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tuple[", "str")))
        ]
        text = "required" if e["type"] == "missing" else str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            text = "unknown key"
        lines.append(f"{_loc(loc)}: {text}")
    return "; ".join(dict.fromkeys(lines))


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


def _check_upstream(index: int, upstream: UpstreamConfig) -> None:
    where = f"upstreams[{index}].auth_broker"
    auth = upstream.auth_broker
    needs_secret = auth.token_endpoint_auth_method is not ClientAuthMethod.NONE
    if auth.mode is Mode.OAUTH_CONNECT:
        for key in ("authorization_endpoint", "client_id", "redirect_uri"):
            if not getattr(auth, key):
                raise ConfigError(f"{where}.{key}: required for mode oauth_connect")
    if auth.client_id is None and auth.mode is not Mode.OAUTH_CONNECT and needs_secret:
        raise ConfigError(f"{where}.client_id: required with {auth.token_endpoint_auth_method.value}")
    if needs_secret and auth.client_secret is None:
        raise ConfigError(
            f"{where}.client_secret: required with token_endpoint_auth_method "
            f"{auth.token_endpoint_auth_method.value} (or set it to none for a public client)"
        )


def load_config(document: Mapping[str, Any], *, environ: Mapping[str, str], base_dir: Path) -> BrokerConfig:
    """Validate a parsed config document. Relative paths are taken from ``base_dir``."""
    try:
        config = BrokerConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
    upstreams = []
    seen: set[str] = set()
    for index, upstream in enumerate(config.upstreams):
        if upstream.name in seen:
            raise ConfigError(f"upstreams[{index}].name: duplicate upstream {upstream.name!r}")
        seen.add(upstream.name)
        auth = _resolve_secret(upstream.auth_broker, f"upstreams[{index}].auth_broker", environ, base_dir)
        upstream = upstream.model_copy(update={"auth_broker": auth})
        _check_upstream(index, upstream)
        upstreams.append(upstream)

    def rooted(path: Path) -> Path:
        return path if path.is_absolute() else base_dir / path

    store = _resolve_store(config.store, environ, base_dir)
    return config.model_copy(
        update={
            "upstreams": tuple(upstreams),
            "store": store.model_copy(update={"path": rooted(store.path)}),
            "keyring": config.keyring.model_copy(update={"file": rooted(config.keyring.file)}),
        }
    )


def load_config_file(path: Path, *, environ: Mapping[str, str]) -> BrokerConfig:
    """Read and validate a YAML config file."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the document must be a mapping")
    return load_config(document, environ=environ, base_dir=path.parent.resolve())
