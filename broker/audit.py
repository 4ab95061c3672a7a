"""The audit trail: one JSON line per security-relevant event.

Events are dataclasses with clear fields only: who called (caller), for whom (user), which
upstream and RPC, what happened (action, outcome) and why (reason: an error code, never an
error's free text). Never a token, code, state, secret or an authorization URL.

Actions: ``connect`` (a connect flow started), ``acquire`` (a credential obtained by a
completed connect flow), ``refresh``, ``exchange``, ``inject`` (Resolve handed out a token),
``deny`` (the user refused a connect flow), ``disconnect``, ``list`` and ``policy_denial``
(a caller refused by the listener's rules).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Protocol

from broker.callers import current_call
from broker.config import AuditConfig

MAX_FIELD = 256

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
    }
)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit record. ``outcome`` is "success", "failure" or "denied"."""

    action: str
    outcome: str
    user: str = ""
    upstream: str = ""
    method: str = ""
    caller: str = ""
    reason: str = ""
    request_id: str = ""
    time: float = 0.0
    detail: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        out = asdict(self)
        out["time"] = _iso(self.time)
        if not self.detail:
            del out["detail"]
        return json.dumps(out, sort_keys=False, separators=(",", ":"))


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
        call = current_call.get()
        event = AuditEvent(
            action=action,
            outcome=outcome,
            user=_clean(user),
            upstream=_clean(upstream),
            method=method or (call.method if call else ""),
            caller=caller or (call.caller if call else ""),
            reason=reason,
            request_id=call.request_id if call else "",
            time=self._now(),
            detail=dict(detail or {}),
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
    """JSON lines into a file that rotates at ``max_bytes`` keeping ``backup_count`` old files."""

    def __init__(self, path: Path, max_bytes: int, backup_count: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, event: AuditEvent) -> None:
        record = logging.LogRecord("audit", logging.INFO, "", 0, event.to_json(), None, None)
        self._handler.handle(record)

    def close(self) -> None:
        self._handler.close()


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


def _iso(seconds: float) -> str:
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1000):03d}Z"
