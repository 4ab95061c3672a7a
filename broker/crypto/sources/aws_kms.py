"""``wrapped_by.type: aws_kms``: a symmetric root key in AWS KMS (or the KMS API at endpoint_url).

Wrapped blob, version 1: ``b"CBA1" || CiphertextBlob`` of ``Encrypt(KeyId=key_id, Plaintext=KEK,
EncryptionContext={"purpose": "credential-broker-kek", "kek_id": <KEK id>})``. The encryption
context binds each blob to its KEK id: Decrypt with another id's context fails (and CloudTrail
logs the context, so a policy can require it with ``kms:EncryptionContext:purpose``).

Serving calls only Decrypt, naming ``key_id`` (so a blob under any other key is refused, not
opened with whatever key the ciphertext names). ``keys rewrap-root`` calls ReEncrypt to
``key_id``: after an automatic rotation the blob moves to the newest backing key; after a manual
rotation (``key_id`` an alias moved to a new key) it moves to the new key. The KEK never leaves
KMS during a re-wrap. Credentials come from boto3's standard chain; none appears in a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config

from broker.config import AwsKmsRootKeyConfig
from broker.errors import KeyringError, RootKeyRefused, RootKeyUnavailable

MAGIC = b"CBA1"
PURPOSE = "credential-broker-kek"
T = TypeVar("T")

# Answers that mean this key does not open this blob (or may not: the same to the operator).
_REFUSED = {
    "InvalidCiphertextException",
    "IncorrectKeyException",
    "InvalidKeyUsageException",
}
# Answers about the key itself, whatever the blob: the operator must fix the key or the config,
# not the keyring file (telling them to restore the file would replace a good keyring).
_KEY_STATE = {
    "NotFoundException": (
        "not found (a wrong keyring.wrapped_by.key_id or region, or a deleted key); check key_id and region"
    ),
    "DisabledException": "disabled; enable it (aws kms enable-key) and start again",
    "KMSInvalidStateException": (
        "not usable in its current state (scheduled for deletion, or its key material is pending "
        "import); if it is pending deletion, run aws kms cancel-key-deletion, then aws kms "
        "enable-key, and start again"
    ),
}
_DENIED = {"AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"}
_INVALID = {
    "ValidationException",
    "InvalidArnException",
    "InvalidParameterValue",
    "InvalidGrantTokenException",
}


def encryption_context(kek_id: str) -> dict[str, str]:
    return {"purpose": PURPOSE, "kek_id": kek_id}


@dataclass
class AwsKmsRootKey:
    """One KMS key (id, ARN or alias) in one region."""

    key_id: str
    region: str
    endpoint_url: str | None = None
    kind: str = "aws_kms"
    _client: Any = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: AwsKmsRootKeyConfig) -> AwsKmsRootKey:
        return cls(config.key_id, config.region, config.endpoint_url)

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"aws_kms key {self.key_id} in {self.region}{where}"

    def client(self) -> Any:
        if self._client is None:
            self._client = boto3.session.Session().client(
                "kms",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                # Bounded calls; the start-up loop does the retrying, with its own deadline.
                config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}),
            )
        return self._client

    def wrap(self, kek_id: str, material: bytes) -> bytes:
        answer = self._call(
            lambda kms: kms.encrypt(
                KeyId=self.key_id, Plaintext=material, EncryptionContext=encryption_context(kek_id)
            )
        )
        return MAGIC + bytes(answer["CiphertextBlob"])

    def unwrap(self, kek_id: str, blob: bytes, *, any_version: bool = False) -> bytes:
        # Without KeyId, KMS uses the key the ciphertext names (rewrap-root after a manual rotation).
        named = {} if any_version else {"KeyId": self.key_id}
        answer = self._call(
            lambda kms: kms.decrypt(
                CiphertextBlob=_body(blob), EncryptionContext=encryption_context(kek_id), **named
            ),
            configured=not any_version,
        )
        material = bytes(answer["Plaintext"])
        if len(material) != 32:
            raise RootKeyRefused("not a KEK")
        return material

    def rewrap(self, kek_id: str, blob: bytes) -> bytes:
        context = encryption_context(kek_id)
        answer = self._call(
            lambda kms: kms.re_encrypt(
                CiphertextBlob=_body(blob),
                SourceEncryptionContext=context,
                DestinationKeyId=self.key_id,
                DestinationEncryptionContext=context,
            ),
            configured=False,
        )
        return MAGIC + bytes(answer["CiphertextBlob"])

    def _call(self, operation: Callable[[Any], T], *, configured: bool = True) -> T:
        """``configured``: the call uses only the configured key (not also one a blob names)."""
        try:
            return operation(self.client())
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _KEY_STATE:
                which = (
                    f"the KMS key {self.key_id} in {self.region}"
                    if configured
                    else "a KMS key of this keyring (the configured one, or the one that wrapped its keys)"
                )
                raise KeyringError(f"{self.describe()}: {which} is {_KEY_STATE[code]} ({code})") from None
            if code in _REFUSED:
                raise RootKeyRefused(code) from None
            if code in _DENIED:
                raise KeyringError(
                    f"{self.describe()}: KMS refused the call ({code}); check the broker's AWS "
                    "credentials and the key policy (docs/data-safety.md)"
                ) from None
            if code in _INVALID:
                raise KeyringError(
                    f"{self.describe()}: KMS rejected the request ({code}); check keyring.wrapped_by"
                ) from None
            raise RootKeyUnavailable(f"{self.describe()}: {code or 'error'}") from None
        except botocore.exceptions.NoCredentialsError:
            raise KeyringError(
                f"{self.describe()}: no AWS credentials found (environment, web identity or instance role)"
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            # Connection refused, DNS, timeouts: the source is unreachable for now.
            raise RootKeyUnavailable(f"{self.describe()}: {type(exc).__name__}") from None


def _body(blob: bytes) -> bytes:
    if not blob.startswith(MAGIC) or len(blob) <= len(MAGIC):
        raise RootKeyRefused("not an aws_kms-wrapped KEK")
    return blob[len(MAGIC) :]
