"""The suite-wide leak check: no secret a test creates may show up where it must never be.

Collected per test: every secret the loopback authorization servers minted or were shown (codes,
access and refresh tokens, client secrets, code verifiers, states), every KEK in a keyring file
under the test's directories, and anything a test adds with :func:`add_secret`. Searched: every
record the broker's logger emitted (message and structured fields), every error status the
servicer returned (message and ErrorInfo metadata, except the ready ``authorization_url``, which
carries a state by design), text a test observed (subprocess logs, CLI output), and the raw
bytes of every SQLite file (main, -wal, -shm) under the test's directories, and every value of
every table in the test's PostgreSQL schema (dumped before the schema is dropped, see
:func:`add_database_dump`).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

_lock = threading.Lock()
_texts: list[tuple[str, str]] = []
_secrets: set[str] = set()
_paths: set[Path] = set()
_dumps: list[tuple[str, bytes]] = []
stats: dict[str, float] = {
    "tests": 0, "secrets": 0, "texts": 0, "files": 0, "bytes": 0, "pg_schemas": 0, "seconds": 0.0,
}  # fmt: skip

MIN_SECRET_LENGTH = 8  # shorter values would match by chance


class CaptureHandler(logging.Handler):
    """Keeps every broker log record as text, fields included."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage() + " " + json.dumps(getattr(record, "fields", {}), default=str)
            if record.exc_info and record.exc_info[1] is not None:
                text += " " + repr(record.exc_info[1])
        except Exception:  # pragma: no cover - a broken record must not break the suite
            text = repr(record.__dict__)
        observe_text(text, f"log {record.levelname} {record.name}")


def observe_text(text: str, where: str) -> None:
    with _lock:
        _texts.append((where, text))


def observe_status(message: str, metadata: dict[str, str]) -> None:
    shown = {k: v for k, v in metadata.items() if k != "authorization_url"}
    observe_text(message + " " + json.dumps(shown), "error returned to a caller")


def add_secret(*values: str | bytes) -> None:
    with _lock:
        for value in values:
            _secrets.add(value.decode("latin-1") if isinstance(value, bytes) else value)


def add_path(path: Path) -> None:
    """A directory whose SQLite files and keyrings belong to the current test(s)."""
    with _lock:
        _paths.add(path)


def add_database_dump(name: str, data: bytes) -> None:
    """Every value a database holds for the current test (PostgreSQL: one schema's tables)."""
    with _lock:
        _dumps.append((name, data))


def _keyring_secrets(directory: Path) -> Iterable[str]:
    for candidate in directory.rglob("*.json"):
        try:
            document = json.loads(candidate.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not isinstance(document, dict) or "credential-broker-keyring" not in str(document.get("format")):
            continue
        for key in document.get("keys", []):
            material = str(key.get("material", ""))
            yield material
            raw = base64.urlsafe_b64decode(material + "=" * (-len(material) % 4))
            yield raw.decode("latin-1")


def check(directories: Iterable[Path], server_secrets: Iterable[str]) -> list[str]:
    """Every leak found, as 'where: which kind of secret' (never the secret itself)."""
    started = time.perf_counter()
    with _lock:
        secrets = {s for s in (*_secrets, *server_secrets) if len(s) >= MIN_SECRET_LENGTH}
        texts = list(_texts)
        dirs = set(directories) | _paths
        dumps = list(_dumps)
    for directory in dirs:
        secrets.update(s for s in _keyring_secrets(directory) if len(s) >= MIN_SECRET_LENGTH)
    found: list[str] = []
    joined = "\n".join(text for _, text in texts)
    for secret in secrets:
        if secret in joined:
            where = next(w for w, t in texts if secret in t)
            found.append(f"{where}: a secret ({_kind(secret)}, {len(secret)} chars)")
    encoded = {s.encode() for s in secrets} | {s.encode("latin-1") for s in secrets if _latin1(s)}
    files = 0
    size = 0
    for directory in dirs:
        for path in directory.rglob("*.db*"):
            data = path.read_bytes()
            files += 1
            size += len(data)
            found += [f"{path.name}: a secret in the raw file ({len(s)} bytes)" for s in encoded if s in data]
    for name, data in dumps:
        size += len(data)
        found += [f"{name}: a secret in a stored value ({len(s)} bytes)" for s in encoded if s in data]
    stats["pg_schemas"] += len(dumps)
    stats["tests"] += 1
    stats["secrets"] += len(secrets)
    stats["texts"] += len(texts)
    stats["files"] += files
    stats["bytes"] += size
    stats["seconds"] += time.perf_counter() - started
    return found


def _latin1(text: str) -> bool:
    return all(ord(c) < 256 for c in text)


def _kind(secret: str) -> str:
    for prefix in ("at_", "rt_", "code_", "cs_"):
        if secret.startswith(prefix):
            return prefix.rstrip("_")
    return "other"


def reset() -> None:
    with _lock:
        _texts.clear()
        _secrets.clear()
        _paths.clear()
        _dumps.clear()
