"""Config errors in plain words: pydantic's validation errors turned into lines a person can act on.

Each line names the field by its path in the document (``upstreams[0].auth_broker.scopes``) and
says what it must be ("must be a list of strings"), not how pydantic saw it ("Input should be a
valid tuple"). An unknown key gets the closest known key at that place ("did you mean
token_endpoint?"). Several errors are listed together under a count, one per line.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

# Patterns used by the config models, in words.
_PATTERNS = {
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$": (
        "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    ),
    r"^[0-9a-f]{64}$": "must be a SHA-256 in lowercase hex (64 characters)",
}
_WHOLE = ("int_type", "int_parsing", "int_from_float", "int_parsing_size")
_NUMBER = ("float_type", "float_parsing", "decimal_type", "decimal_parsing")
_BOOL = ("bool_type", "bool_parsing")
_MAPPING = ("dict_type", "model_type", "model_attributes_type", "mapping_type")
_LIST = ("tuple_type", "list_type", "iterable_type", "set_type", "frozen_set_type")
_SHOWN_INPUT = 40  # a value is echoed only for a number/bool parse error, and only when short


def format_errors(problems: Sequence[str]) -> str:
    """One problem as its line; several under a count, one indented line each."""
    unique = list(dict.fromkeys(problems))
    if len(unique) == 1:
        return unique[0]
    return "\n".join([f"{len(unique)} errors in the config:", *(f"  {line}" for line in unique)])


def validation_problems(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per field that failed, in document order; a union's alternatives on one line."""
    texts: dict[str, list[str]] = {}
    for e in err.errors():
        if e["type"] == "string_type" and isinstance(e["input"], dict):
            continue  # the str branch of a "string or mapping" union: the mapping branch explains
        path, annotation, known = _walk(root, e["loc"])
        texts.setdefault(_loc(path), []).append(_plain(e, annotation, known))
    for where in list(texts):
        if any(other.startswith(f"{where}[") for other in texts):
            # A union's list branch failed on an item: that explains it; drop "must be a string".
            kept = [t for t in texts[where] if t != "must be a string"]
            if kept:
                texts[where] = kept
            else:
                del texts[where]
    return [f"{where}: {_either(dict.fromkeys(found))}" for where, found in texts.items()]


def _either(found: typing.Iterable[str]) -> str:
    """``must be a string`` and ``must be a list`` read as ``must be a string or a list``."""
    texts = list(found)
    if len(texts) > 1 and all(t.startswith("must be ") for t in texts):
        return "must be " + " or ".join(t.removeprefix("must be ") for t in texts)
    return " or ".join(texts)


def _plain(e: ErrorDetails, annotation: Any, known: Sequence[str]) -> str:
    kind = e["type"]
    ctx: dict[str, Any] = dict(e.get("ctx") or {})
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        key = str(e["loc"][-1]) if e["loc"] else ""
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        return f"unknown key; did you mean {close[0]}?" if close else "unknown key"
    if kind in _LIST:
        return "must be a list of strings" if _element(annotation) is str else "must be a list"
    if kind == "string_type":
        return "must be a string"
    if kind in _WHOLE:
        return "must be a whole number" + _got(e)
    if kind in _NUMBER:
        return "must be a number" + _got(e)
    if kind in _BOOL:
        return "must be true or false" + _got(e)
    if kind in _MAPPING:
        return "must be a mapping (key: value)"
    if kind in ("literal_error", "enum"):
        return "must be one of " + str(ctx.get("expected", "")).replace(" or ", ", ")
    if kind == "greater_than":
        return f"must be more than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "string_too_short":
        return (
            "must not be empty"
            if ctx.get("min_length") == 1
            else f"must be at least {ctx.get('min_length')} characters"
        )
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return _PATTERNS.get(pattern, f"must match the pattern {pattern}")
    return str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _got(e: ErrorDetails) -> str:
    value = e.get("input")
    if isinstance(value, str) and len(value) <= _SHOWN_INPUT and value.isprintable():
        return f" (got {value!r})"
    return ""


def _walk(root: type[BaseModel], loc: Sequence[int | str]) -> tuple[list[int | str], Any, list[str]]:
    """The field path of an error location (union member tags dropped), the annotation at its
    end (None when unknown) and the keys known at the last mapping (for an unknown key)."""
    path: list[int | str] = []
    current: Any = root
    known: list[str] = []
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            current = _element(current)
            continue
        model = _model_of(current)
        if model is not None and part in model.model_fields:
            known = list(model.model_fields)
            path.append(part)
            current = model.model_fields[part].annotation
            continue
        if _origin(current) is dict:
            path.append(part)  # a key of a free-form mapping
            current = typing.get_args(_unwrap(current))[1]
            continue
        member = _member(current, part)
        if member is not None:
            current = member  # pydantic names the union member it tried: not part of the path
            continue
        if part.startswith(("function-", "lax-or-strict", "json-or-python")):
            continue
        if model is not None:
            known = list(model.model_fields)
        path.append(part)  # an unknown key
        current = None
    return path, current, known


def _loc(parts: Sequence[int | str]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _unwrap(annotation: Any) -> Any:
    members = _members(annotation)
    return members[0] if len(members) == 1 else annotation


def _origin(annotation: Any) -> Any:
    return typing.get_origin(_unwrap(annotation))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _member(annotation: Any, tag: str) -> Any:
    """The union member pydantic means by ``tag`` (``str``, ``tuple[str, ...]``, a model name)."""
    members = _members(annotation)
    if len(members) < 2:
        return None
    for member in members:
        origin = typing.get_origin(member)
        name = getattr(origin or member, "__name__", None)
        if name is not None and (tag == name or tag.startswith(f"{name}[")):
            return member
    return None


def _element(annotation: Any) -> Any:
    """The element type of a tuple/list annotation (or of its Optional), else None."""
    if annotation is None:
        return None
    for member in _members(annotation):
        if typing.get_origin(member) in (tuple, list, set, frozenset):
            args = typing.get_args(member)
            return args[0] if args else None
    return None
