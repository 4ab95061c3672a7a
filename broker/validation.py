"""Checks on request fields: every failure names the field and says what is wrong."""

from __future__ import annotations

import re

from broker.errors import InvalidArgument, Unauthenticated

MAX_USER_ID = 256
MAX_UPSTREAM = 64
MAX_STATE = 128
MAX_CODE = 4096
MAX_ERROR = 64
MAX_ERROR_DESCRIPTION = 2048
MAX_SUBJECT_TOKEN = 16 * 1024
MAX_MIN_VALID_SECONDS = 24 * 3600

_UPSTREAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_STATE = re.compile(r"[A-Za-z0-9_-]+")
_ERROR = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 section 4.1.2.1 charset


def _printable(value: str) -> bool:
    return value.isprintable() and value == value.strip()


def user_id(value: str) -> str:
    if not value:
        raise Unauthenticated("user_id: required (the user the credential is for)")
    if len(value) > MAX_USER_ID:
        raise InvalidArgument(f"user_id: must be at most {MAX_USER_ID} characters")
    if not _printable(value):
        raise InvalidArgument("user_id: must be printable text without control characters or edge spaces")
    return value


def upstream(value: str) -> str:
    if not value:
        raise InvalidArgument("upstream: required")
    if len(value) > MAX_UPSTREAM or not _UPSTREAM.fullmatch(value):
        raise InvalidArgument(
            f"upstream: must be an upstream name (letters, digits, '.', '_', '-', at most {MAX_UPSTREAM})"
        )
    return value


def state(value: str) -> str:
    if not value:
        raise InvalidArgument("state: required")
    if len(value) > MAX_STATE or not _STATE.fullmatch(value):
        raise InvalidArgument(f"state: must be a base64url string of at most {MAX_STATE} characters")
    return value


def code(value: str) -> str:
    if not value:
        raise InvalidArgument("code: required")
    if len(value) > MAX_CODE or not value.isascii() or not _printable(value):
        raise InvalidArgument(f"code: must be printable ASCII of at most {MAX_CODE} characters")
    return value


def oauth_error(value: str) -> str:
    if not value:
        raise InvalidArgument("error: required (the callback's error code, e.g. access_denied)")
    if len(value) > MAX_ERROR or not _ERROR.fullmatch(value):
        raise InvalidArgument(f"error: must be an OAuth error code of at most {MAX_ERROR} characters")
    return value


def error_description(value: str) -> str:
    if len(value) > MAX_ERROR_DESCRIPTION:
        raise InvalidArgument(f"error_description: must be at most {MAX_ERROR_DESCRIPTION} characters")
    return value


def subject_token(value: str) -> str:
    if len(value) > MAX_SUBJECT_TOKEN:
        raise InvalidArgument(f"subject_token: must be at most {MAX_SUBJECT_TOKEN} characters")
    if value and (not value.isascii() or not _printable(value)):
        raise InvalidArgument("subject_token: must be printable ASCII")
    return value


def min_valid_seconds(value: int) -> int:
    if not 0 <= value <= MAX_MIN_VALID_SECONDS:
        raise InvalidArgument(f"min_valid_seconds: must be between 0 and {MAX_MIN_VALID_SECONDS}")
    return value
