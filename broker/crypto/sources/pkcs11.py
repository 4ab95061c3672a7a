"""``wrapped_by.type: pkcs11``: a root AES key on a PKCS#11 token (an HSM), through python-pkcs11.

Wrapped blob, version 1 (pinned by tests/test_root_key_sources.py)::

    offset  size  field
    0       4     magic b"CBP1"
    4       1     mechanism: 1 = CKM_AES_KEY_WRAP_KWP (RFC 5649), 2 = CKM_AES_GCM
    5       2     n, length of the root key's label (big endian)
    7       n     the root key's CKA_LABEL (UTF-8)
    then    KWP:  C_WrapKey(root, generic secret of sha256(binding) || KEK)   (72 bytes)
            GCM:  12-byte nonce || C_Encrypt(root, KEK, aad=binding)            (48 bytes)

    binding = kek_binding(KEK id, root label)       (broker/crypto/sources/base.py)

KWP has no associated data, so the binding's digest is wrapped together with the KEK (KWP is
authenticated: a changed byte fails the unwrap) and checked after it; GCM takes it as AAD.
KWP is used when the token offers it (``C_GetMechanismList``), AES-GCM otherwise.

The label in the header says which key wrapped the blob. Serving unwraps only with the
configured ``key_label``; ``keys rewrap-root`` (after a rotation: a new key under a new label,
``key_label`` set to it) unwraps with the key the header names on the same token and wraps under
the configured one. A PIN the token refuses is never retried (a retry could lock the token).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from broker.config import Pkcs11RootKeyConfig
from broker.crypto.sources.base import kek_binding
from broker.errors import KeyringError, RootKeyRefused, RootKeyUnavailable

MAGIC = b"CBP1"
KWP, GCM = 1, 2
_NONCE = 12
_DIGEST = 32
_KEK = 32
_libraries: dict[str, Any] = {}
_lock = threading.Lock()
T = TypeVar("T")

# The token or its connection is missing or failing: worth a retry at start-up.
_UNAVAILABLE = (
    p11.NoSuchToken,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.DeviceError,
    p11.DeviceRemoved,
    p11.DeviceMemory,
    p11.SessionCount,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.FunctionFailed,
)
# This key does not open this blob.
_REFUSED = (
    p11.WrappedKeyInvalid,
    p11.WrappedKeyLenRange,
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataLenRange,
    p11.GeneralError,  # SoftHSM2 answers a failed AES-GCM tag check with CKR_GENERAL_ERROR
)


@dataclass
class Pkcs11RootKey:
    """One AES key, by label, on one token of one PKCS#11 module."""

    module: Path
    token_label: str
    key_label: str
    pin: str
    #: "auto" (KWP when offered, else AES-GCM), or "kwp" / "gcm" to insist on one.
    mechanism: str = "auto"
    kind: str = "pkcs11"

    @classmethod
    def from_config(cls, config: Pkcs11RootKeyConfig, environ: Mapping[str, str]) -> Pkcs11RootKey:
        # A refused PIN counts against the token (a real HSM locks it after a few): take the PIN
        # as an editor or a Secret delivers it, without a byte order mark or a line end.
        if config.pin_env is not None:
            pin = environ.get(config.pin_env, "").removeprefix("\ufeff").rstrip("\r\n")
            if not pin:
                raise KeyringError(f"keyring.wrapped_by.pin_env: {config.pin_env} is not set")
        else:
            assert config.pin_file is not None
            try:
                pin = config.pin_file.read_bytes().decode("utf-8-sig").strip()
            except OSError as exc:
                raise KeyringError(
                    f"keyring.wrapped_by.pin_file: cannot read {config.pin_file} ({exc.strerror})"
                ) from None
            except UnicodeDecodeError:
                raise KeyringError(
                    f"keyring.wrapped_by.pin_file: {config.pin_file} is not UTF-8 text"
                ) from None
            if not pin:
                raise KeyringError(f"keyring.wrapped_by.pin_file: {config.pin_file} is empty")
        return cls(config.module, config.token_label, config.key_label, pin)

    def __repr__(self) -> str:
        return f"Pkcs11RootKey({self.describe()})"

    def describe(self) -> str:
        return f"pkcs11 key {self.key_label!r} on token {self.token_label!r}"

    def wrap(self, kek_id: str, material: bytes) -> bytes:
        return self._call(lambda session: self._wrap(session, kek_id, material))

    def unwrap(self, kek_id: str, blob: bytes, *, any_version: bool = False) -> bytes:
        label, mechanism, body = _parse(blob)
        if label != self.key_label and not any_version:
            raise RootKeyRefused("wrapped by another key")
        return self._call(
            lambda session: _unwrap(session, self._key(session, label), kek_id, label, mechanism, body)
        )

    def rewrap(self, kek_id: str, blob: bytes) -> bytes:
        label, mechanism, body = _parse(blob)

        def run(session: Any) -> bytes:
            material = _unwrap(session, self._key(session, label), kek_id, label, mechanism, body)
            return self._wrap(session, kek_id, material)

        return self._call(run)

    # --- one session per operation ------------------------------------------------------------

    def _call(self, operation: Callable[[Any], T]) -> T:
        try:
            with self._session() as session:
                return operation(session)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinExpired, p11.PinLocked) as exc:
            raise KeyringError(
                f"the PKCS#11 token {self.token_label!r} refused the PIN ({type(exc).__name__}); "
                "check keyring.wrapped_by.pin_file / pin_env"
            ) from None
        except _UNAVAILABLE as exc:
            raise RootKeyUnavailable(f"{self.describe()}: {type(exc).__name__}") from None
        except p11.NoSuchKey:
            raise RootKeyRefused("no such key on the token") from None
        except p11.MultipleObjectsReturned:
            raise KeyringError(
                f"more than one key labelled {self.key_label!r} on token {self.token_label!r}; "
                "labels of root keys must be unique"
            ) from None
        except _REFUSED:
            raise RootKeyRefused("does not unwrap") from None
        except p11.PKCS11Error as exc:
            # Anything else (a mechanism or attribute the key or token does not allow): the
            # operator's to fix; never retried, named by its PKCS#11 error only.
            raise KeyringError(
                f"{self.describe()}: the token refused the operation ({type(exc).__name__}); check "
                "the key's attributes (docs/data-safety.md, PKCS#11 token setup)"
            ) from None

    @contextmanager
    def _session(self) -> Iterator[Any]:
        library = _library(self.module)
        try:
            session = self._open(library)
        except (p11.NoSuchToken, p11.GeneralError, *_UNAVAILABLE):
            # The token went away or came back (an HSM restarted or back online) since the module
            # was initialised: its slot list is stale, and SoftHSM2 answers CKR_GENERAL_ERROR
            # until C_Finalize/C_Initialize. Start the module afresh and try once more.
            with _lock:
                library.reinitialize()
            try:
                session = self._open(library)
            except p11.GeneralError:
                # Before any key is used, a general error is the device's, never "does not unwrap".
                raise RootKeyUnavailable(f"{self.describe()}: GeneralError") from None
        with session:
            yield session

    def _open(self, library: Any) -> Any:
        """A logged-in read-write session on the token (PIN errors pass through)."""
        return library.get_token(token_label=self.token_label).open(rw=True, user_pin=self.pin)

    def _key(self, session: Any, label: str) -> Any:
        return session.get_key(label=label, key_type=KeyType.AES, object_class=ObjectClass.SECRET_KEY)

    def _wrap(self, session: Any, kek_id: str, material: bytes) -> bytes:
        if len(material) != _KEK:
            raise KeyringError("a KEK must be 32 bytes")
        root = self._key(session, self.key_label)
        binding = kek_binding(kek_id, self.key_label)
        mechanism = self._mechanism(session, root)
        if mechanism == KWP:
            _allowed(root, "wrap_key", "CKA_WRAP")
            value = hashlib.sha256(binding).digest() + material
            temporary = session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                    Attribute.VALUE: value,
                    Attribute.TOKEN: False,
                    Attribute.EXTRACTABLE: True,
                    Attribute.SENSITIVE: False,
                }
            )
            try:
                body = root.wrap_key(temporary, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            finally:
                temporary.destroy()
        else:
            _allowed(root, "encrypt", "CKA_ENCRYPT")
            nonce = os.urandom(_NONCE)
            body = nonce + root.encrypt(
                material, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, binding, 128)
            )
        return _header(self.key_label, mechanism) + bytes(body)

    def _mechanism(self, session: Any, root: Any) -> int:
        if self.mechanism == "gcm":
            return GCM
        if self.mechanism == "kwp":
            return KWP
        # KWP where the token offers it and the key may wrap; AES-GCM otherwise.
        offered = Mechanism.AES_KEY_WRAP_PAD in session.token.slot.get_mechanisms()
        return KWP if offered and hasattr(root, "wrap_key") else GCM


def _allowed(root: Any, method: str, attribute: str) -> None:
    """python-pkcs11 offers a key's operations only where its attributes allow them."""
    if not hasattr(root, method):
        raise KeyringError(
            f"the root key may not do this ({attribute} is not set); the token refused the operation "
            "(docs/data-safety.md, PKCS#11 token setup)"
        )


def _library(module: Path) -> Any:
    """One loaded module per path per process (C_Initialize once)."""
    with _lock:
        if str(module) not in _libraries:
            if not module.is_file():
                raise KeyringError(f"keyring.wrapped_by.module: no PKCS#11 module at {module}")
            try:
                _libraries[str(module)] = pkcs11.lib(str(module))
            except (RuntimeError, OSError):
                raise KeyringError(f"keyring.wrapped_by.module: cannot load {module}") from None
        return _libraries[str(module)]


def _header(label: str, mechanism: int) -> bytes:
    raw = label.encode()
    return MAGIC + bytes((mechanism,)) + struct.pack(">H", len(raw)) + raw


def _parse(blob: bytes) -> tuple[str, int, bytes]:
    """(root key label, mechanism, body); RootKeyRefused for anything malformed."""
    if len(blob) < 7 or not blob.startswith(MAGIC) or blob[4] not in (KWP, GCM):
        raise RootKeyRefused("not a PKCS#11-wrapped KEK")
    (size,) = struct.unpack(">H", blob[5:7])
    if len(blob) < 7 + size:
        raise RootKeyRefused("truncated")
    try:
        label = blob[7 : 7 + size].decode()
    except UnicodeDecodeError:
        raise RootKeyRefused("bad label") from None
    return label, blob[4], blob[7 + size :]


def _unwrap(session: Any, root: Any, kek_id: str, label: str, mechanism: int, body: bytes) -> bytes:
    binding = kek_binding(kek_id, label)
    if mechanism == GCM:
        _allowed(root, "decrypt", "CKA_DECRYPT")
        if len(body) != _NONCE + _KEK + 16:
            raise RootKeyRefused("bad length")
        params = GCMParams(body[:_NONCE], binding, 128)
        return bytes(root.decrypt(body[_NONCE:], mechanism=Mechanism.AES_GCM, mechanism_param=params))
    if len(body) != _DIGEST + _KEK + 8:
        raise RootKeyRefused("bad length")
    _allowed(root, "unwrap_key", "CKA_UNWRAP")
    unwrapped = root.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.GENERIC_SECRET,
        body,
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        store=False,
        template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
    )
    try:
        value = bytes(unwrapped[Attribute.VALUE])
    finally:
        unwrapped.destroy()
    if len(value) != _DIGEST + _KEK or not hmac.compare_digest(
        value[:_DIGEST], hashlib.sha256(binding).digest()
    ):
        raise RootKeyRefused("bound to another KEK id")
    return value[_DIGEST:]
