"""The audit trail: one JSON line per security-relevant event.

Events are dataclasses with clear fields only: who called (caller), for whom (user), which
upstream and RPC, what happened (action, outcome) and why (reason: an error code, never an
error's free text). Never a token, code, state, secret or an authorization URL.

Actions: ``connect`` (a connect flow started), ``acquire`` (a credential obtained by a
completed connect flow), ``refresh``, ``exchange``, ``inject`` (Resolve handed out a token),
``deny`` (the user refused a connect flow), ``disconnect``, ``list``, ``policy_denial``
(a caller refused by the listener's rules) and ``retention`` (the reaper deleted, or in a dry
run would delete, a credential, old events or expired connect flows: broker/retention.py).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path
from typing import IO, Protocol

from broker.callers import current_call
from broker.config import AuditConfig

MAX_FIELD = 256
_ENCODER = json.JSONEncoder(separators=(",", ":"))
# Quoted line prefixes by (action, outcome, user, upstream, method, caller, reason): bounded.
MAX_PREFIXES = 1024
_PREFIXES: dict[tuple[str, ...], str] = {}

ACTIONS = frozenset(
    {
        "connect",
        "acquire",
        "refresh",
        "exchange",
        "inject",
        "deny",
        "disconnect",
        "list",
        "policy_denial",
        "retention",
    }
)


@dataclass(slots=True)
class AuditEvent:
    """One audit record. ``outcome`` is "success", "failure" or "denied".

    Not frozen only because a frozen dataclass costs ~2 us more to build, on every Resolve;
    nothing changes an event once it is made."""

    action: str
    outcome: str
    user: str = ""
    upstream: str = ""
    method: str = ""
    caller: str = ""
    reason: str = ""
    request_id: str = ""
    time: float = 0.0
    detail: dict[str, str] | None = None

    def to_json(self) -> str:
        # Built by hand (this runs on every Resolve); every value is quoted by the json
        # module's C string encoder (non-ASCII as \\u escapes). The part before the request id
        # repeats from call to call (same action, user, upstream, caller), so it is quoted once.
        key = (self.action, self.outcome, self.user, self.upstream, self.method, self.caller, self.reason)
        prefix = _PREFIXES.get(key)
        if prefix is None:
            if len(_PREFIXES) >= MAX_PREFIXES:
                _PREFIXES.clear()
            prefix = _PREFIXES[key] = (
                f'{{"action":{_quote(self.action)},"outcome":{_quote(self.outcome)},'
                f'"user":{_quote(self.user)},"upstream":{_quote(self.upstream)},'
                f'"method":{_quote(self.method)},"caller":{_quote(self.caller)},'
                f'"reason":{_quote(self.reason)},"request_id":'
            )
        line = f'{prefix}{_quote(self.request_id)},"time":"{_iso(self.time)}"'
        if self.detail:
            line += f',"detail":{_ENCODER.encode(self.detail)}'
        return line + "}"


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None: ...


class Auditor:
    """What the service and servicer call: fills in time, caller, method and request id
    from the call in progress, then hands the event to every sink."""

    def __init__(self, sinks: Sequence[AuditSink] = (), now: Callable[[], float] = time.time) -> None:
        self._sinks = list(sinks)
        self._now = now

    def add_sink(self, sink: AuditSink) -> None:
        self._sinks.append(sink)

    def record(
        self,
        action: str,
        outcome: str,
        *,
        user: str = "",
        upstream: str = "",
        reason: str = "",
        method: str = "",
        caller: str = "",
        detail: dict[str, str] | None = None,
    ) -> None:
        assert action in ACTIONS, action
        # Runs on every Resolve: the common case (short printable values) skips _clean, and the
        # event is built positionally (keywords cost a dataclass twice as much).
        if len(user) > MAX_FIELD or not user.isprintable():
            user = _clean(user)
        if len(upstream) > MAX_FIELD or not upstream.isprintable():
            upstream = _clean(upstream)
        call = current_call.get()
        request_id = ""
        if call is not None:
            method = method or call.method
            caller = caller or call.caller
            request_id = call.request_id
        event = AuditEvent(
            action,
            outcome,
            user,
            upstream,
            method,
            caller,
            reason,
            request_id,
            self._now(),
            dict(detail) if detail else None,
        )
        for sink in self._sinks:
            sink.emit(event)


class JsonLinesSink:
    """Writes each event as one JSON line to a stream (stdout by default)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        line = event.to_json() + "\n"
        stream = self._stream or sys.stdout
        with self._lock:
            stream.write(line)
            stream.flush()


class RotatingFileSink:
    """JSON lines appended to a file (mode 0600) that rotates at ``max_bytes``, keeping
    ``backup_count`` old files (``audit.log.1`` is the newest).

    Each line is one unbuffered ``write`` on an ``O_APPEND`` descriptor: an event is in the file
    as soon as ``emit`` returns, so a crash of the broker loses none, and the cost stays at one
    system call (no logging machinery on the hot path)."""

    def __init__(self, path: Path, max_bytes: int, backup_count: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._max_bytes = max_bytes
        self._backups = backup_count
        self._lock = threading.Lock()
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        return os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def emit(self, event: AuditEvent) -> None:
        line = (event.to_json() + "\n").encode()
        with self._lock:
            if self._size and self._size + len(line) > self._max_bytes:
                self._rotate()
            os.write(self._fd, line)
            self._size += len(line)

    def _rotate(self) -> None:
        os.close(self._fd)
        if self._backups > 0:
            for n in range(self._backups - 1, 0, -1):
                older = self._path.with_name(f"{self._path.name}.{n}")
                if older.exists():
                    os.replace(older, self._path.with_name(f"{self._path.name}.{n + 1}"))
            os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))
        else:
            self._path.unlink(missing_ok=True)
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


class MemorySink:
    """Keeps events in a list (tests, and anything that wants to look at recent events)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


def sink_from_config(config: AuditConfig) -> AuditSink | None:
    if config.output == "none":
        return None
    if config.output == "file":
        assert config.path is not None  # by config
        return RotatingFileSink(config.path, config.max_bytes, config.backup_count)
    return JsonLinesSink()


def _clean(value: str) -> str:
    """Request fields reach the trail unvalidated on failures: keep them short and printable."""
    value = value[:MAX_FIELD]
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")[:MAX_FIELD]


_second_cache: tuple[int, str] = (-1, "")
_MILLIS = [f".{n:03d}Z" for n in range(1000)]


def _iso(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds; the formatted second is reused (one strftime a second)."""
    global _second_cache
    whole = int(seconds)
    cached_whole, prefix = _second_cache
    if cached_whole != whole:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second_cache = (whole, prefix)
    return prefix + _MILLIS[int((seconds - whole) * 1000)]
