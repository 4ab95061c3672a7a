"""Shared helpers for the Kubernetes tests: offline schema validation and a test TLS cert."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Kubernetes version whose official OpenAPI-derived JSON schemas we validate against. The
#: schemas ship inside the pinned ``kubernetes-validate`` wheel, so nothing is downloaded.
#: Native sidecars (init containers with ``restartPolicy: Always``) need >= 1.29.
KUBERNETES_VERSION = "1.31"

REPO_ROOT = Path(__file__).resolve().parents[2]


def validate_k8s(resource: dict[str, Any]) -> None:
    """Validate one resource strictly (unknown fields are errors) against the pinned schemas."""
    try:
        validated = kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        name = resource.get("metadata", {}).get("name")
        pytest.fail(f"{resource.get('kind')}/{name}: {exc.message} at {where}")
    # kubernetes-validate silently falls back to an older schema set; make sure it did not.
    assert validated == KUBERNETES_VERSION


@pytest.fixture
def k8s_validate() -> Callable[[dict[str, Any]], None]:
    """The strict offline validator, as a fixture."""
    return validate_k8s


def write_self_signed_cert(directory: Path, common_name: str) -> tuple[Path, Path]:
    """Write a throwaway self-signed cert for 127.0.0.1/localhost to tls.crt/tls.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "tls.crt"
    key_path = directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key, generated at test time (never committed)."""
    return write_self_signed_cert(tmp_path_factory.mktemp("tls"), "credential-broker-test")
