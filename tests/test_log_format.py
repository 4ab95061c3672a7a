"""Text log lines cannot be forged: every value is logfmt-quoted and escaped where it must be.

Each line is parsed back with a small logfmt parser written here, and must give exactly the
fields that were logged, with their original values: a space, ``=``, a quote, a newline or an
invisible character in a value can neither add a field nor start a line.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker._proto.credentialbroker.v1 import broker_pb2 as pb
from broker.logs import TextFormatter
from tests.authserver import AuthServer
from tests.live import REQUEST_HEADER, start_live_broker

# -- a logfmt parser, independent of the formatter --------------------------------------------

_PREFIX = re.compile(r"(\d\d:\d\d:\d\d) ([a-z]+) +")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The string quoted at text[i] (a '"'), and the index after its closing quote."""
    assert text[i] == '"'
    out: list[str] = []
    i += 1
    while True:
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            e = text[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
            elif e == "u":
                out.append(chr(int(text[i + 2 : i + 6], 16)))
                i += 6
            elif e == "U":
                out.append(chr(int(text[i + 2 : i + 10], 16)))
                i += 10
            else:
                raise AssertionError(f"unknown escape \\{e} in {text!r}")
            continue
        assert c.isprintable(), f"raw unprintable {c!r} inside a quoted value"
        out.append(c)
        i += 1


def parse_line(line: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(level, message, [(key, value), ...]) of one text log line."""
    assert line.splitlines() == [line], f"not exactly one line: {line!r}"
    prefix = _PREFIX.match(line)
    assert prefix is not None, line
    i = prefix.end()
    if line[i:].startswith('"'):
        message, i = _quoted(line, i)
    else:
        words = []
        while i < len(line):
            end = line.find(" ", i)
            end = len(line) if end < 0 else end
            if "=" in line[i:end]:
                break
            words.append(line[i:end])
            i = end + 1
        message = " ".join(words)
    pairs: list[tuple[str, str]] = []
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        key = _KEY.match(line, i)
        assert key is not None and line[key.end()] == "=", f"no key at {line[i:]!r}"
        i = key.end() + 1
        if i < len(line) and line[i] == '"':
            value, i = _quoted(line, i)
        else:
            end = line.find(" ", i)
            end = len(line) if end < 0 else end
            value = line[i:end]
            assert '"' not in value and "=" not in value and "\\" not in value, value
            i = end
        assert i == len(line) or line[i] == " ", f"junk after a value: {line[i:]!r}"
        pairs.append((key.group(), value))
    return prefix.group(2), message, pairs


# -- the formatter directly -------------------------------------------------------------------

HOSTILE = [
    "mallory upstream=prod-admin",
    'x" upstream="prod-admin',
    "a\nb",
    "alice\r\n12:00:00 error   forged user_id=root",
    'q"uote',
    "back\\slash",
    "back\\",
    'ends with a quote"',
    "tab\there",
    "\u2028line separator",
    "\u2029paragraph",
    "\x85next line",
    "\x0bvertical\x0cform\x1cfile",
    "zero\u200bwidth",
    "\u202eright-to-left",
    "\ufeffbom",
    "nul\x00",
    "\x1b[31mred\x1b[0m",
    "lone \ud800 surrogate",
    "tag \U000e0041 char",
    "no\u00a0break",
    "ideographic\u3000space",
    "",
    " ",
    "=",
    '"',
    "\\u0041",
    "caf\u00e9",
    "\u0430lice",
    "plain",
]


def _format(message: str, **values: Any) -> str:
    record = logging.LogRecord("credential_broker", logging.WARNING, __file__, 1, message, None, None)
    record.fields = values
    return TextFormatter().format(record)


def _safe(line: str) -> None:
    line.encode("utf-8")  # no lone surrogate reaches the stream
    assert all(c.isprintable() for c in line), f"invisible or control character in {line!r}"


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_value_parses_back_as_one_field(value: str) -> None:
    line = _format("connect flow started", user_id=value, upstream="gh")
    _safe(line)
    assert parse_line(line) == ("warning", "connect flow started", [("user_id", value), ("upstream", "gh")])


def test_non_text_values_are_written_as_their_text() -> None:
    line = _format("refresh failed; will retry", failures=3, retry=None, ok=True, ratio=0.5, error="http_5xx")
    assert parse_line(line)[2] == [
        ("failures", "3"),
        ("retry", "None"),
        ("ok", "True"),
        ("ratio", "0.5"),
        ("error", "http_5xx"),
    ]
    # Plain values stay bare, as before.
    assert line.endswith(" failures=3 retry=None ok=True ratio=0.5 error=http_5xx")


def test_a_message_with_hostile_characters_is_quoted_too() -> None:
    line = _format("event user_id=root\nforged")
    _safe(line)
    assert parse_line(line) == ("warning", "event user_id=root\nforged", [])


@settings(max_examples=300, deadline=None)
@given(
    values=st.dictionaries(st.sampled_from(["user_id", "upstream", "error", "detail"]), st.text(max_size=30))
)
def test_any_values_parse_back_exactly(values: dict[str, str]) -> None:
    line = _format("token request failed", **values)
    _safe(line)
    assert parse_line(line) == ("warning", "token request failed", list(values.items()))


# -- end to end: a broker process logging text to its stderr ----------------------------------

ALLOWED = [  # user ids the broker's validation lets through (printable, no edge spaces)
    "mallory upstream=prod-admin",
    'x" upstream="prod-admin',
    "eve\\ user_id=root",
    "caf\u00e9 = bar",
]


def test_a_hostile_user_id_cannot_forge_a_field_in_a_real_server_log(
    tmp_path: Path, auth_server: AuthServer
) -> None:
    live = start_live_broker(tmp_path, auth_server, log={"format": "text"})
    try:
        stub = live.stub()
        for user in ALLOWED:
            stub.BuildAuthorizationURL(
                pb.BuildAuthorizationURLRequest(user_id=user, upstream=live.upstream),
                metadata=(REQUEST_HEADER,),
            )
            with pytest.raises(grpc.RpcError):  # not connected: a flow is started, and logged
                stub.Resolve(
                    pb.ResolveRequest(user_id=user, upstream=live.upstream), metadata=(REQUEST_HEADER,)
                )
        deadline = time.monotonic() + 10
        while live.logs().count("connect flow started") < 2 * len(ALLOWED) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        live.stop()
    lines = [line for line in live.logs().splitlines() if _PREFIX.match(line)]
    started = [parse_line(line) for line in lines if "connect flow started" in line]
    assert len(started) == 2 * len(ALLOWED)
    for _, message, pairs in started:
        assert message == "connect flow started"
        assert [k for k, _ in pairs] == ["user_id", "upstream"], pairs
        assert dict(pairs)["upstream"] == live.upstream
    assert sorted(dict(p)["user_id"] for _, _, p in started) == sorted(ALLOWED * 2)
    for line in lines:  # every line the process wrote parses
        parse_line(line)
