"""Root key sources for wrapped keyrings: a KMS or an HSM holds the key that wraps every KEK.

Each source is its own module behind one interface, :class:`RootKey` (broker/crypto/sources/base.py),
and is imported only when the config names it, so its client library (python-pkcs11, boto3) is an
optional extra: ``pip install 'credential-broker[pkcs11]'`` or ``'credential-broker[aws]'``.
"""

from __future__ import annotations

from collections.abc import Mapping

from broker.config import AwsKmsRootKeyConfig, Pkcs11RootKeyConfig
from broker.crypto.sources.base import RootKey
from broker.errors import KeyringError

__all__ = ["RootKey", "root_key_for"]


def root_key_for(config: Pkcs11RootKeyConfig | AwsKmsRootKeyConfig, environ: Mapping[str, str]) -> RootKey:
    """The root key ``keyring.wrapped_by`` names. Raises KeyringError when its library is missing
    or its PIN cannot be read; nothing is contacted yet."""
    try:
        if isinstance(config, Pkcs11RootKeyConfig):
            from broker.crypto.sources.pkcs11 import Pkcs11RootKey

            return Pkcs11RootKey.from_config(config, environ)
        from broker.crypto.sources.aws_kms import AwsKmsRootKey

        return AwsKmsRootKey.from_config(config)
    except ImportError as exc:
        extra = "pkcs11" if isinstance(config, Pkcs11RootKeyConfig) else "aws"
        raise KeyringError(
            f"keyring.wrapped_by.type {config.type} needs the {exc.name} library: "
            f"pip install 'credential-broker[{extra}]'"
        ) from None
