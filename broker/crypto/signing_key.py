"""The client's own private key for private_key_jwt (RFC 7523 section 2.2): read once, checked,
never shown.

Only keys whose JWS algorithm every authorization server that takes private_key_jwt accepts:
RSA of 2048 bits or more (RS256, RFC 7518 section 3.3) and EC P-256 (ES256, section 3.4). The
file must be private (the keyring's rule, broker/crypto/keyfile.py), and unencrypted PEM.
Errors name the file and what is wrong with it, never a byte of it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

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

    def __repr__(self) -> str:
        return f"SigningKey(alg={self.alg}, kid={self.kid!r})"


def load_signing_key(path: Path, kid: str | None = None) -> SigningKey:
    """The key in ``path``; raises ValueError with a reason that names the file, not its content."""
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
