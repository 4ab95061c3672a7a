"""Outbound TLS: the one SSL context every outbound HTTPS client uses, and telling a certificate
that failed verification from a network failure.

The context is built once at start-up (broker/app.py) and passed as ``verify=`` to each httpx
client: token endpoints, RFC 8414 discovery, and the identity provider's discovery and JWKS.
It trusts what httpx trusts by default (certifi's bundle; the environment is not read), plus
the CA certificates of ``http.ca_file`` when set: a private CA adds to that trust, never
replaces it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from broker.config import load_ca_file

# OpenSSL's X509_V_ERR_* codes (include/openssl/x509_vfy.h), in plain words. Each phrase
# follows "the ... TLS certificate"; none names a host, a URL or anything the server sent.
_EXPIRED = 10
_NOT_YET_VALID = 9
_UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20, 21, 27})
_WRONG_HOST = frozenset({62, 64})
_ISSUER_UNTRUSTED = "was issued by a CA the broker does not trust (add that CA to http.ca_file)"


def outbound_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """The context for every outbound HTTPS request: the default trust, plus ``ca_file``'s CAs.
    Raises ConfigError (one line) when ``ca_file`` cannot be read or holds no certificate."""
    context = httpx.create_ssl_context(trust_env=False)
    if ca_file is not None:
        load_ca_file(context, ca_file)
    return context


def certificate_problem(error: BaseException) -> str | None:
    """Why the server's certificate was refused, when ``error`` (an httpx error, through its
    causes) comes from certificate verification; None for any other failure."""
    seen: BaseException | None = error
    for _ in range(8):  # httpx -> httpcore -> ssl: a short chain
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return _phrase(seen.verify_code)
        seen = seen.__cause__ or seen.__context__
    return None


def _phrase(code: int) -> str:
    if code == _EXPIRED:
        return "has expired"
    if code == _NOT_YET_VALID:
        return "is not valid yet"
    if code in _WRONG_HOST:
        return "does not name the host it was reached at"
    if code in _UNTRUSTED_ISSUER:
        return _ISSUER_UNTRUSTED
    return "failed verification (if a private CA issued it, add that CA to http.ca_file)"


def untrusted(who: str, problem: str) -> str:
    """The error text for a certificate that failed verification: starts "certificate not
    trusted" (broker/lifecycle.py classes it by that)."""
    return f"certificate not trusted: {who}'s TLS certificate {problem}"
