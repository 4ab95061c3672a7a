"""Client keys and JWTs for private_key_jwt tests, generated at run time (never committed).

:class:`ClientKey` is a private key written to a 0600 PEM file, as an operator would keep it,
with the public half as a JWK for the authorization server to trust. :func:`service_account_token`
signs a JWT the way a Kubernetes API server signs a projected service account token, for the
workload identity federation tests (``client_assertion_file``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from tests import leakcheck

ALGORITHMS = {"RS256": "RSA", "ES256": "EC"}


@dataclass
class ClientKey:
    alg: str
    private: RSAKey | ECKey
    public: RSAKey | ECKey
    pem: bytes
    kid: str

    @classmethod
    def generate(cls, alg: str = "RS256") -> ClientKey:
        raw: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if alg == "RS256":
            raw = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            raw = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(alg)
        pem = raw.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # Every line of the key's body joins the leak check: none may appear in logs or errors.
        leakcheck.add_secret(*(line for line in pem.splitlines() if len(line) >= 40))
        private: RSAKey | ECKey = RSAKey.import_key(raw) if alg == "RS256" else ECKey.import_key(raw)
        public: RSAKey | ECKey = (
            RSAKey.import_key(raw.public_key()) if alg == "RS256" else ECKey.import_key(raw.public_key())
        )
        return cls(alg, private, public, pem, f"kid-{secrets.token_hex(4)}")

    def write(self, path: Path, mode: int = 0o600) -> Path:
        path.write_bytes(self.pem)
        path.chmod(mode)
        return path

    def certificate(self, path: Path | None = None) -> x509.Certificate:
        """A self-signed certificate for this key (as uploaded to an Entra app registration),
        written as PEM to ``path`` when given."""
        raw = self.private.raw_value
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"client {self.kid}")])
        now = datetime.datetime.now(datetime.UTC)
        algorithm = hashes.SHA256()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(raw.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(raw, algorithm)
        )
        if path is not None:
            path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return certificate

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK, with this key's kid and alg."""
        return {**self.public.as_dict(private=False), "kid": self.kid, "alg": self.alg, "use": "sig"}


def thumbprint_s256(certificate: x509.Certificate) -> str:
    """RFC 7515 section 4.1.8: base64url SHA-256 of the certificate's DER encoding."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def service_account_token(
    key: ClientKey, *, issuer: str, subject: str, audience: str, ttl: int = 3600
) -> str:
    """A JWT shaped like a Kubernetes projected service account token."""
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": [audience],
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": secrets.token_urlsafe(12),
    }
    token = jwt.encode({"alg": key.alg, "kid": key.kid}, claims, key.private)
    leakcheck.add_secret(token)
    return token
