"""The client's own private key for private_key_jwt (RFC 7523 section 2.2): read once, checked,
never shown.

Only keys whose JWS algorithm every authorization server that takes private_key_jwt accepts:
RSA of 2048 bits or more (RS256, RFC 7518 section 3.3) and EC P-256 (ES256, section 3.4). The
file must be private (the keyring's rule, broker/crypto/keyfile.py), and unencrypted PEM.
Errors name the file and what is wrong with it, never a byte of it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

from broker.crypto.keyfile import exposure

MAX_KEY_FILE_BYTES = 64 * 1024
MIN_RSA_BITS = 2048
_KINDS = "an RSA (2048 bits or more) or EC P-256 private key, unencrypted PEM"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A loaded client key: the JWS ``alg`` it signs with, the key, and the ``kid`` to send."""

    alg: str
    key: RSAKey | ECKey
    kid: str | None
    # RFC 7515 sections 4.1.7 and 4.1.8: SHA-1 and SHA-256 thumbprints of the key's certificate.
    x5t: str | None = None
    x5t_s256: str | None = None

    def __repr__(self) -> str:
        return f"SigningKey(alg={self.alg}, kid={self.kid!r})"


def load_signing_key(path: Path, kid: str | None = None, certificate: Path | None = None) -> SigningKey:
    """The key in ``path`` (with the thumbprints of ``certificate``, which must be this key's);
    raises ValueError with a reason that names the file, not its content."""
    key = _load_key(path, kid)
    if certificate is None:
        return key
    return _with_certificate(key, certificate)


def _with_certificate(key: SigningKey, path: Path) -> SigningKey:
    """The key with its certificate's thumbprints; the certificate must hold this very key."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
        certificate = x509.load_pem_x509_certificate(data)
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    except ValueError:
        raise ValueError(f"{path} is not a PEM X.509 certificate") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*spki) != key.key.public_key.public_bytes(*spki):
        raise ValueError(f"{path} is not the certificate of private_key_file")
    der = certificate.public_bytes(serialization.Encoding.DER)
    return SigningKey(
        key.alg,
        key.key,
        key.kid,
        x5t=_b64url(hashlib.sha1(der).digest()),  # noqa: S324 - a thumbprint (RFC 7515 4.1.7), not a signature
        x5t_s256=_b64url(hashlib.sha256(der).digest()),
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _load_key(path: Path, kid: str | None) -> SigningKey:
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            problem = exposure(status.st_mode, status.st_uid, os.geteuid())
            if problem is not None:
                raise ValueError(
                    f"{path} has mode {stat.S_IMODE(status.st_mode):04o}: {problem}; "
                    f"make it private with `chmod 600 {path}`"
                )
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is not {_KINDS} (it is larger than {MAX_KEY_FILE_BYTES} bytes)")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's text may quote the input: only our own words leave.
        raise ValueError(f"{path} is not {_KINDS}") from None
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size >= MIN_RSA_BITS:
        return SigningKey("RS256", RSAKey.import_key(private), kid)
    if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1):
        return SigningKey("ES256", ECKey.import_key(private), kid)
    raise ValueError(f"{path} is not {_KINDS}")
