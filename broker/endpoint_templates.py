"""Per-connection endpoints: ``{name}`` placeholders filled from a connection's own values.

Shopify and Zendesk put the customer's shop or subdomain in every URL, Entra the tenant. An
upstream declares each placeholder with a strict pattern (``connection_params: {shop:
{pattern: "^[a-z0-9][a-z0-9-]{0,62}$"}}``); a caller gives the values to BuildAuthorizationURL.

The safety argument has two halves, both checked here:

* At config load, a pattern must be anchored and its whole language must be non-empty strings
  of at most 63 characters from ``A-Z a-z 0-9 - _`` (checked on the parsed regular expression,
  not by trying values). No value can then carry ``.``, ``/``, ``:``, ``@``, ``%``, ``?``,
  ``#``, ``\\``, a space, a newline or any non-ASCII letter, so it can neither add a host label
  nor leave the path segment or host label it is put in. A template may put placeholders in the
  host (inside one label, with at least two fixed labels after it, so ``{shop}.myshopify.com``
  but never ``{host}`` or ``{x}.com``) and in the path; never in the scheme, the port, user
  info or the query.
* At use, every value is matched again (``re.fullmatch``, ASCII) and checked against that
  alphabet, and the filled URL must keep the template's scheme, port and fixed host labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# re's own parser: the pattern rule is checked on the parsed expression.
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any
from urllib.parse import urlsplit

from broker.errors import InvalidArgument

#: The characters a connection param's value may ever contain.
SAFE_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
#: A value is at most one DNS label long.
MAX_VALUE_LENGTH = 63
#: The name of a connection param (and of its placeholder).
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,31}$"
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_-]{1,63}", re.ASCII)
_UNICODE_FLAG = sre.SRE_FLAG_UNICODE


def check_pattern(pattern: str) -> None:
    """Raise ValueError unless every string ``pattern`` matches is 1 to 63 characters from
    SAFE_CHARACTERS and the pattern is anchored at both ends."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc.msg})") from None
    if parsed.state.flags & ~_UNICODE_FLAG:
        raise ValueError("must not set regular expression flags such as (?i)")
    items = list(parsed)
    starts = ((sre.AT, sre.AT_BEGINNING), (sre.AT, sre.AT_BEGINNING_STRING))
    ends = ((sre.AT, sre.AT_END), (sre.AT, sre.AT_END_STRING))
    if len(items) < 2 or items[0] not in starts or items[-1] not in ends:
        raise ValueError("must be anchored: start with ^ and end with $ (alternatives inside a group)")
    _check_nodes(items)
    low, high = parsed.getwidth()
    if low < 1:
        raise ValueError("must not match the empty string")
    if high > MAX_VALUE_LENGTH:
        raise ValueError(f"must bound the length to at most {MAX_VALUE_LENGTH} characters (one DNS label)")


def _check_nodes(items: Any) -> None:
    for op, arg in items:
        if op is sre.AT:
            continue
        if op is sre.LITERAL:
            _check_char(arg)
        elif op is sre.IN:
            for inner_op, inner in arg:
                if inner_op is sre.LITERAL:
                    _check_char(inner)
                elif inner_op is sre.RANGE:
                    for code in range(inner[0], inner[1] + 1):
                        _check_char(code)
                else:
                    raise ValueError(_ONLY)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            _check_nodes(arg[2])
        elif op is sre.SUBPATTERN:
            if arg[1]:
                raise ValueError("must not set regular expression flags such as (?i)")
            _check_nodes(arg[3])
        elif op is sre.BRANCH:
            for branch in arg[1]:
                _check_nodes(branch)
        else:
            raise ValueError(_ONLY)


_ONLY = (
    "may only use literal characters and [...] classes of A-Z, a-z, 0-9, '-' and '_' "
    "(no '.', '/', ':', '@', '%', '?', '#', '\\', \\w, \\d, '.' wildcards or negated classes), "
    "so that a value can never change the URL's host or scheme"
)


def _check_char(code: int) -> None:
    if chr(code) not in SAFE_CHARACTERS:
        raise ValueError(_ONLY)


def placeholders(template: str) -> list[str]:
    """The names in ``template``'s ``{name}`` placeholders, in order."""
    return PLACEHOLDER.findall(template)


def check_template(template: str, declared: Mapping[str, object]) -> None:
    """Raise ValueError unless ``template``'s placeholders are declared and sit only where a
    safe value cannot change the scheme, the port or the host beyond one label's text."""
    names = placeholders(template)
    if "{" in PLACEHOLDER.sub("", template) or "}" in PLACEHOLDER.sub("", template):
        raise ValueError("has an unbalanced '{' or '}'")
    for name in names:
        if name not in declared:
            raise ValueError(f"{{{name[:40]}}} is not declared in connection_params")
    if not names:
        return
    parts = urlsplit(template)
    if PLACEHOLDER.search(parts.scheme) or "@" in parts.netloc:
        raise ValueError("may not have placeholders in the scheme or user info")
    host = parts.hostname or ""
    try:
        parts.port  # noqa: B018 - raises for a placeholder (or anything else) in the port
    except ValueError:
        raise ValueError("may not have a placeholder in the port") from None
    if len(PLACEHOLDER.findall(parts.netloc)) != len(PLACEHOLDER.findall(host)):
        raise ValueError("may not have a placeholder in the port")
    if PLACEHOLDER.search(parts.query):
        raise ValueError("may not have placeholders in the query")
    if PLACEHOLDER.search(host):
        labels = host.split(".")
        last = max(i for i, label in enumerate(labels) if PLACEHOLDER.search(label))
        fixed = labels[last + 1 :]
        if len(fixed) < 2 or not all(re.fullmatch(r"[A-Za-z0-9-]{1,63}", label) for label in fixed):
            raise ValueError(
                "a placeholder in the host must sit inside one label followed by at least two "
                "fixed labels (e.g. https://{shop}.myshopify.com), so the host stays under a "
                "domain the config names"
            )


def check_values(values: Mapping[str, str], declared: Mapping[str, str]) -> dict[str, str]:
    """The caller's ``connection_params``: every declared param given, each matching its
    pattern; else InvalidArgument naming the param (never echoing a value)."""
    for key in values:
        if key not in declared:
            shown = repr(key) if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key) else "a key"
            known = ", ".join(sorted(declared)) or "none"
            raise InvalidArgument(
                f"connection_params: {shown} is not declared for this upstream (declared: {known})"
            )
    out: dict[str, str] = {}
    for name, pattern in declared.items():
        value = values.get(name)
        if value is None or value == "":
            raise InvalidArgument(f"connection_params.{name}: required for this upstream")
        if not matches(value, pattern):
            raise InvalidArgument(f"connection_params.{name}: does not match the pattern configured for it")
        out[name] = value
    return out


def matches(value: str, pattern: str) -> bool:
    """``value`` matches ``pattern`` whole, and uses only the safe alphabet."""
    return _SAFE_VALUE.fullmatch(value) is not None and re.fullmatch(pattern, value, re.ASCII) is not None


def fill(template: str, values: Mapping[str, str], declared: Mapping[str, str]) -> str:
    """``template`` with each placeholder replaced by its value, checked again here; the
    filled URL must keep the template's scheme, port and fixed host labels."""
    names = placeholders(template)
    if not names:
        return template
    for name in names:
        value = values.get(name)
        pattern = declared.get(name)
        if value is None or pattern is None or not matches(value, pattern):
            raise InvalidArgument(
                f"connection_params.{name}: missing or not matching the pattern configured for it; "
                "reconnect with a valid value"
            )
    filled = PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    before, after = urlsplit(template), urlsplit(filled)
    template_labels = (before.hostname or "").split(".")
    filled_labels = (after.hostname or "").split(".")
    if (
        before.scheme != after.scheme
        or before.port != after.port
        or len(template_labels) != len(filled_labels)
        or any(
            t != f for t, f in zip(template_labels, filled_labels, strict=True) if not PLACEHOLDER.search(t)
        )
    ):
        raise InvalidArgument(
            "connection_params: the filled endpoint would change its host"
        )  # pragma: no cover
    return filled
