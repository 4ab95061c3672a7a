"""Start-up checks that need no server: can each address be bound, can each socket be made there.

``serve`` runs them before it creates any file, and the gRPC server runs the unix-socket one
again right before it binds; ``config check`` runs them instead of serving. Each problem is one
line that names the config entry: ``listen[1]: 127.0.0.1:50061 is already in use``.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.config import BrokerConfig, TlsConfig

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
_PROBE_TIMEOUT_SECONDS = 2.0


def describe_bind_error(address: str, exc: OSError) -> str:
    """Why ``address`` could not be bound, in words, from the OS error."""
    if exc.errno == errno.EADDRINUSE:
        return f"{address} is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{address} is not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"{address}: permission denied (ports below 1024 need privileges)"
    return f"{address}: cannot bind ({exc.strerror or exc})"


def tcp_problem(address: str) -> str | None:
    """Bind ``host:port`` and close it again; the reason it failed, or None.

    SO_REUSEADDR as gRPC sets it, so a port left in TIME_WAIT by a previous run is no problem."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"{address}: cannot resolve {host}"
    family, kind, proto, _, where = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as exc:
            return describe_bind_error(address, exc)
    return None


def folder_problem(path: Path) -> str | None:
    """Whether a file can be made at ``path``: its nearest existing folder (the server creates
    the rest) must be a folder this process can write to."""
    current = path.parent
    while True:
        try:
            found = current.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            current = current.parent
        except OSError as exc:
            return f"{current}: {exc.strerror or exc}"
    if not stat.S_ISDIR(found.st_mode):
        return f"{current} is not a folder"
    if not os.access(current, os.W_OK | os.X_OK):
        return f"{current} is not writable"
    return None


def existing_socket_problem(path: Path) -> str | None:
    """Whether a file already at ``path`` may be replaced: only a stale socket of our own.

    A socket something answers on belongs to a live process (another broker): never taken over."""
    try:
        found = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if found.st_uid != os.geteuid():
        return (
            f"{path} is owned by uid {found.st_uid}, not this process (uid {os.geteuid()}); "
            "refusing to replace it"
        )
    if not stat.S_ISSOCK(found.st_mode):
        return f"{path} exists and is not a socket; refusing to replace it"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT_SECONDS)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # stale: nothing listens on it
        except OSError as exc:
            return f"cannot tell whether another process is serving on {path} ({exc.strerror or exc})"
    return f"another process is serving on {path}"


def private_socket_path(path: Path) -> Path:
    """A fresh name beside ``path`` for the server to bind before renaming it to ``path``."""
    return path.with_name(f".{secrets.token_hex(6)}.sock")


def unix_problem(address: str) -> str | None:
    """Every check for a ``unix:///path`` listener, as the message after ``listen[i]: ``."""
    path = Path(address.removeprefix("unix://"))
    folder = folder_problem(path)
    if folder is not None:
        return f"{address}: {folder}"
    if max(len(os.fsencode(path)), len(os.fsencode(private_socket_path(path)))) > MAX_SOCKET_PATH_BYTES:
        return f"{address}: too long for a unix socket path (at most {MAX_SOCKET_PATH_BYTES} bytes)"
    return existing_socket_problem(path)


def address_problem(address: str) -> str | None:
    """The check for one listen address of either kind."""
    return unix_problem(address) if address.startswith("unix://") else tcp_problem(address)


def listener_problems(config: BrokerConfig) -> list[str]:
    """Every listen, health and metrics address that cannot be used, one line each."""
    problems = []
    for index, listener in enumerate(config.listeners()):
        problem = address_problem(listener.address)
        if problem is not None:
            problems.append(f"listen[{index}]: {problem}")
    for where, address in (
        ("health_listen", config.health_listen),
        ("metrics.listen", config.metrics.listen),
        ("connect.listen", config.connect.listen if config.connect is not None else None),
    ):
        if address is not None:
            problem = address_problem(address)
            if problem is not None:
                problems.append(f"{where}: {problem}")
    return problems


def file_problems(config: BrokerConfig) -> list[str]:
    """The TLS files can be read, and the SQLite store's folder can be used (without creating it)."""
    problems = []
    if config.tls is not None:
        problems += _tls_problems(config.tls)
    if config.store.backend == "sqlite" and not config.store.path.exists():
        problem = folder_problem(config.store.path)
        if problem is not None:
            problems.append(f"store.path: {config.store.path}: {problem}")
    return problems


def _tls_problems(tls: TlsConfig) -> list[str]:
    """The TLS files read and parse as PEM, and the key is the certificate's."""
    found: dict[str, bytes] = {}
    problems = []
    for key in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, key)
        if path is None:
            continue
        try:
            found[key] = Path(path).read_bytes()
        except OSError as exc:
            problems.append(f"tls.{key}: cannot read {path} ({exc.strerror or exc})")
    certificate = private_key = None
    for key, data in found.items():
        try:
            if key == "key_file":
                private_key = serialization.load_pem_private_key(data, password=None)
            else:
                chain = x509.load_pem_x509_certificates(data)
                certificate = chain[0] if key == "cert_file" else certificate
        except (ValueError, TypeError):
            kind = "an unencrypted PEM private key" if key == "key_file" else "PEM certificates"
            problems.append(f"tls.{key}: {getattr(tls, key)} is not {kind}")
    if certificate is not None and private_key is not None:
        raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if certificate.public_key().public_bytes(*raw) != private_key.public_key().public_bytes(*raw):
            problems.append(f"tls.key_file: {tls.key_file} is not the key of tls.cert_file {tls.cert_file}")
    return problems


def not_checked(config: BrokerConfig) -> list[str]:
    """What ``config check`` cannot know without serving, one line each."""
    lines = []
    if config.store.backend == "postgres":
        lines.append("the PostgreSQL store (not contacted)")
    for upstream in config.upstreams:
        if upstream.auth_broker.issuer is not None:
            lines.append(
                f"discovery for upstream {upstream.name} ({upstream.auth_broker.issuer} not contacted)"
            )
    if config.identity is not None:
        lines.append(f"the identity provider's keys ({config.identity.issuer} not contacted)")
    return lines
