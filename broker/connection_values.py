"""A connection's own values: the connection params a caller gives BuildAuthorizationURL (and
the endpoints they fill), and the connection fields kept with the credential and returned to
callers (Salesforce's ``instance_url``, QuickBooks' ``realmId``).

Both are sealed with the tokens (broker/vault.py), never in clear columns. Fields come from the
token answer (read by broker/providers/shaping.py), the callback's query (the app passes it in
``CompleteRequest.callback_params``) or the connect request's params. Only names the upstream
declares are read; nothing else the caller sends is kept, logged or echoed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from broker import endpoint_templates
from broker.config import UpstreamConfig
from broker.errors import InvalidArgument
from broker.providers.shaping import field_value_ok

Pairs = tuple[tuple[str, str], ...]

#: Bounds on what a caller may send in a map field (connection_params, callback_params).
MAX_ENTRIES = 64
MAX_KEY_LENGTH = 128
MAX_VALUE_LENGTH = 4096


def _check_map(name: str, values: Mapping[str, str]) -> None:
    if len(values) > MAX_ENTRIES:
        raise InvalidArgument(f"{name}: at most {MAX_ENTRIES} entries")
    for key, value in values.items():
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument(f"{name}: a key is longer than {MAX_KEY_LENGTH} characters")
        if len(value) > MAX_VALUE_LENGTH:
            shown = f".{key}" if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key) else ""
            raise InvalidArgument(f"{name}{shown}: the value is longer than {MAX_VALUE_LENGTH} characters")


def connect_params(upstream: UpstreamConfig, given: Mapping[str, str]) -> Pairs:
    """The caller's connection params for a new connect flow, each checked against its declared
    pattern (InvalidArgument naming the param, never echoing its value)."""
    _check_map("connection_params", given)
    declared = upstream.auth_broker.connection_patterns()
    if not declared and not given:
        return ()
    return tuple(sorted(endpoint_templates.check_values(given, declared).items()))


def check_callback_params(given: Mapping[str, str]) -> None:
    """Bounds on CompleteRequest.callback_params, checked before the flow is consumed."""
    _check_map("callback_params", given)


def endpoint(upstream: UpstreamConfig, template: str, params: Pairs) -> str:
    """``template`` (one of the upstream's endpoints) filled with the connection's params."""
    return endpoint_templates.fill(template, dict(params), upstream.auth_broker.connection_patterns())


def needs_params(upstream: UpstreamConfig) -> bool:
    """True when a connect flow cannot start without connection params."""
    return bool(upstream.auth_broker.connection_params)


def connect_fields(
    upstream: UpstreamConfig, params: Pairs, callback: Mapping[str, str], never: Collection[str] = ()
) -> dict[str, str]:
    """The fields a connect flow fills from its params and the callback's query. A callback
    value that is not printable, longer than the bound, or one of ``never`` (the flow's code
    and state) is left out."""
    own = dict(params)
    out: dict[str, str] = {}
    for name, source in upstream.auth_broker.connection_fields.items():
        if source.param is None:
            continue
        if source.source == "connect":
            value = own.get(source.param)
        elif source.source == "callback":
            value = callback.get(source.param)
        else:
            continue
        if value is not None and field_value_ok(value) and value not in never:
            out[name] = value
    return out


def merged_fields(
    upstream: UpstreamConfig, previous: Pairs, extra: Mapping[str, str], answer: Pairs
) -> Pairs:
    """The fields to store: the previous ones, then the connect flow's, then the token
    answer's, each only while the upstream still declares it."""
    declared = upstream.auth_broker.connection_fields
    combined = {**dict(previous), **extra, **dict(answer)}
    return tuple(sorted((k, v) for k, v in combined.items() if k in declared))
