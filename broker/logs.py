"""Structured logs: ``logger.info("event", extra={"fields": {...}})``, as text or JSON lines.

Callers pass only non-secret fields (user id, upstream, error class); nothing here inspects
values for secrets, so that rule is kept where the fields are chosen. What is checked here is
the shape of a text line: values (a user id is the caller's text) are written by logfmt rules,
so no value can fake a field or start a line (see :func:`logfmt_value`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import unicodedata
from typing import Any

LOGGER_NAME = "credential_broker"


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a structured log call."""
    return {"fields": values}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        return json.dumps(out, default=str)


# A value written bare: printable ASCII other than space, '"', '=' and '\\'.
_BARE = re.compile(r"[!#-<>-\[\]-~]+")
# A message written bare: the same, with single spaces between words.
_BARE_MESSAGE = re.compile(r"[!#-<>-\[\]-~]+(?: [!#-<>-\[\]-~]+)*")
# Inside quotes, printable ASCII other than '"' and '\\' is written as is.
_PLAIN_QUOTED = re.compile(r"[ !#-\[\]-~]*")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _escape(char: str) -> str:
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    # Control, format (zero-width, bidi), surrogate, private-use and unassigned characters, and
    # every separator but the plain space, could hide or break a line: written as escapes.
    category = unicodedata.category(char)
    if category[0] == "C" or (category[0] == "Z" and char != " "):
        code = ord(char)
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return char


def logfmt_value(value: object) -> str:
    """``value`` as a logfmt value: bare when it is printable text without a space, '"', '='
    or '\\'; otherwise double-quoted, with \\n \\r \\t \\" \\\\ and \\uXXXX (\\UXXXXXXXX above
    U+FFFF) for every control, invisible or separator character, so it reads back exactly."""
    text = value if isinstance(value, str) else str(value)
    if _BARE.fullmatch(text) or (text.isprintable() and text and not any(c in text for c in ' "=\\')):
        return text
    if _PLAIN_QUOTED.fullmatch(text):
        return f'"{text}"'
    return '"' + "".join(map(_escape, text)) + '"'


def _logfmt_key(key: str) -> str:
    # Keys are the code's own keyword names; anything else is made one.
    return key if _KEY.fullmatch(key) else re.sub(r"[^A-Za-z0-9_.-]", "_", key) or "_"


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level message key=value ...``: the message bare when it is plain words,
    quoted like a value otherwise; values by :func:`logfmt_value`."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(
            f"{_logfmt_key(str(k))}={logfmt_value(v)}" for k, v in getattr(record, "fields", {}).items()
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = record.getMessage()
        if not _BARE_MESSAGE.fullmatch(message):
            message = logfmt_value(message)
        return f"{stamp} {record.levelname.lower():7} {message}" + (f" {extra}" if extra else "")


def configure(fmt: str, level: str) -> logging.Logger:
    """Route the broker's logger to stderr in the chosen format."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
