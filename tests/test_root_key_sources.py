"""The root key sources on their own, against a real SoftHSM2 token and a real local-kms: the wrapped
blob's format, the binding of each blob to its KEK id, tampering, both PKCS#11 mechanisms (KWP and
AES-GCM), and the start-up retry with backoff (a fake clock; the unreachable KMS is real)."""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path

import pytest

from broker.crypto.keyring import Keyring, new_key_entry
from broker.crypto.wrapped import WrappedKeyringFile
from broker.errors import KeyringError, RootKeyRefused, RootKeyUnavailable
from tests import leakcheck
from tests.rootkeys import (
    ALIAS,
    PIN_ENV,
    REGION,
    SOFTHSM_MODULE,
    TOKEN_LABEL,
    LocalKms,
    SoftHsmRoot,
    free_port,
)


def _kek() -> bytes:
    material = secrets.token_bytes(32)
    leakcheck.add_secret(material, material.hex())
    return material


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsmRoot:
    root = SoftHsmRoot(tmp_path, monkeypatch)
    from broker.crypto.sources import pkcs11 as source

    # This process may have loaded the module for another test's token folder: read this one's.
    source._library(SOFTHSM_MODULE).reinitialize()
    return root


def _pkcs11(hsm: SoftHsmRoot, mechanism: str = "auto", label: str | None = None) -> object:
    from broker.crypto.sources.pkcs11 import Pkcs11RootKey

    return Pkcs11RootKey(SOFTHSM_MODULE, TOKEN_LABEL, label or hsm.label, os.environ[PIN_ENV], mechanism)


@pytest.mark.parametrize(("mechanism", "code", "size"), [("kwp", 1, 72), ("gcm", 2, 12 + 32 + 16)])
def test_pkcs11_blob_format_binding_and_tampering(
    hsm: SoftHsmRoot, mechanism: str, code: int, size: int
) -> None:
    from broker.crypto.sources.pkcs11 import Pkcs11RootKey

    root = _pkcs11(hsm, mechanism)
    assert isinstance(root, Pkcs11RootKey)
    kek = _kek()
    blob = root.wrap("k00000001", kek)
    label = hsm.label.encode()
    # magic, mechanism, label length, label, body: the wire format pinned.
    assert blob[:4] == b"CBP1" and blob[4] == code
    assert blob[5:7] == struct.pack(">H", len(label)) and blob[7 : 7 + len(label)] == label
    assert len(blob) == 7 + len(label) + size and kek not in blob
    assert root.unwrap("k00000001", blob) == kek
    with pytest.raises(RootKeyRefused):
        root.unwrap("k00000002", blob)  # bound to its KEK id
    for index in (4, 8, len(blob) - 1, len(blob) // 2 + 5):
        flipped = bytearray(blob)
        flipped[index] ^= 0x01
        with pytest.raises(RootKeyRefused):
            root.unwrap("k00000001", bytes(flipped))
    with pytest.raises(RootKeyRefused):
        root.unwrap("k00000001", blob[:-1])
    # Another key on the token does not open it; rewrap-root moves it to that key.
    hsm.generate("root-9")
    other = _pkcs11(hsm, mechanism, "root-9")
    assert isinstance(other, Pkcs11RootKey)
    with pytest.raises(RootKeyRefused):
        other.unwrap("k00000001", blob)
    assert other.unwrap("k00000001", blob, any_version=True) == kek
    moved = other.rewrap("k00000001", blob)
    assert other.unwrap("k00000001", moved) == kek and b"root-9" in moved[:20]


def test_pkcs11_auto_uses_key_wrap_where_the_token_offers_it(hsm: SoftHsmRoot) -> None:
    root = _pkcs11(hsm)
    assert root.wrap("k1", _kek())[4] == 1  # type: ignore[attr-defined]


def test_pkcs11_a_key_that_may_not_wrap_is_named_not_retried(hsm: SoftHsmRoot) -> None:
    """KWP insisted on with a key lacking CKA_WRAP: the operator's to fix, said so at once; the
    same key works through AES-GCM (encrypt/decrypt), the fallback for tokens without KWP."""
    hsm.generate("encrypt-only", wrap=False)
    with pytest.raises(KeyringError) as caught:
        _pkcs11(hsm, "kwp", "encrypt-only").wrap("k1", _kek())  # type: ignore[attr-defined]
    assert not isinstance(caught.value, RootKeyUnavailable | RootKeyRefused)
    assert "the token refused the operation" in caught.value.message
    gcm = _pkcs11(hsm, "gcm", "encrypt-only")
    kek = _kek()
    assert gcm.unwrap("k1", gcm.wrap("k1", kek)) == kek  # type: ignore[attr-defined]


def test_pkcs11_wrong_pin_is_refused_at_once_without_naming_it(hsm: SoftHsmRoot, tmp_path: Path) -> None:
    from broker.crypto.sources.pkcs11 import Pkcs11RootKey

    wrong = secrets.token_hex(8)
    leakcheck.add_secret(wrong)
    root = Pkcs11RootKey(SOFTHSM_MODULE, TOKEN_LABEL, hsm.label, wrong)
    ticks: list[float] = []
    ring = WrappedKeyringFile(tmp_path / "k.json", root, 30, sleep=ticks.append, monotonic=lambda: 0.0)
    with pytest.raises(KeyringError) as caught:
        ring.save(Keyring([new_key_entry("primary")]))
    assert not isinstance(caught.value, RootKeyUnavailable) and ticks == []  # never retried
    assert "refused the PIN" in caught.value.message and wrong not in caught.value.message
    assert hsm.pin not in caught.value.message


def test_aws_kms_blob_binding_tampering_and_wrong_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.crypto.sources.aws_kms import AwsKmsRootKey

    kms = LocalKms(tmp_path, monkeypatch)
    try:
        root = AwsKmsRootKey(ALIAS, REGION, kms.endpoint)
        kek = _kek()
        blob = root.wrap("k00000001", kek)
        assert blob[:4] == b"CBA1" and kek not in blob
        assert root.unwrap("k00000001", blob) == kek
        with pytest.raises(RootKeyRefused):
            root.unwrap("k00000002", blob)  # the encryption context binds the KEK id
        flipped = bytearray(blob)
        flipped[-5] ^= 0x01
        with pytest.raises(RootKeyRefused):
            root.unwrap("k00000001", bytes(flipped))
        other = AwsKmsRootKey(kms.client().create_key()["KeyMetadata"]["KeyId"], REGION, kms.endpoint)
        with pytest.raises(RootKeyRefused):
            other.unwrap("k00000001", blob)  # serving decrypts only with its own key
        assert other.unwrap("k00000001", blob, any_version=True) == kek
        assert other.unwrap("k00000001", other.rewrap("k00000001", blob)) == kek
    finally:
        kms.stop()


def test_unreachable_kms_is_retried_with_backoff_until_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real closed port; the clock is fake, so the backoff sequence is exact."""
    from broker.crypto.sources.aws_kms import AwsKmsRootKey

    kms = LocalKms(tmp_path, monkeypatch)
    root = AwsKmsRootKey(ALIAS, REGION, kms.endpoint)
    path = tmp_path / "keyring.json"
    WrappedKeyringFile(path, root).save(Keyring([new_key_entry("primary")]))
    kms.stop()
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    ring = WrappedKeyringFile(
        path, AwsKmsRootKey(ALIAS, REGION, kms.endpoint), 10, sleep=sleep, monotonic=lambda: now[0]
    )
    with pytest.raises(RootKeyUnavailable) as caught:
        ring.load()
    assert sleeps == [0.2, 0.4, 0.8, 1.6, 3.2, pytest.approx(3.8)]
    message = caught.value.message
    assert "aws_kms" in message and "keyring.unwrap_timeout_seconds (10 s)" in message
    assert (
        os.environ["AWS_SECRET_ACCESS_KEY"] not in message and os.environ["AWS_ACCESS_KEY_ID"] not in message
    )

    # The KMS comes back during the first wait: the second attempt succeeds.
    def sleep_and_restart(seconds: float) -> None:
        sleep(seconds)
        if kms.proc is None:
            kms.start()

    sleeps.clear()
    ring.sleep = sleep_and_restart
    try:
        assert ring.load().primary_id
        assert sleeps == [0.2]
    finally:
        kms.stop()


def test_a_closed_port_is_unavailable_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.crypto.sources.aws_kms import AwsKmsRootKey

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets.token_hex(16))
    root = AwsKmsRootKey(ALIAS, REGION, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RootKeyUnavailable):
        root.unwrap("k1", b"CBA1" + b"\x00" * 40)


@pytest.mark.parametrize(
    ("wrapped_by", "expected"),
    [
        ({"type": "vault_transit", "address": "http://127.0.0.1:8200"}, "'pkcs11', 'aws_kms'"),
        (
            {"type": "pkcs11", "module": "/m.so", "token_label": "t", "key_label": "k"},
            "exactly one of pin_file, pin_env",
        ),
        (
            {
                "type": "pkcs11",
                "module": "/m.so",
                "token_label": "t",
                "key_label": "k",
                "pin_env": "A",
                "pin_file": "p",
            },
            "exactly one of pin_file, pin_env",
        ),
        (
            {"type": "aws_kms", "key_id": "alias/x", "region": "eu-west-1", "endpoint_url": "file:///etc"},
            "endpoint_url",
        ),
        (
            {"type": "aws_kms", "key_id": "alias/x", "region": "eu-west-1", "secret_access_key": "x"},
            "secret_access_key",
        ),
    ],
)
def test_wrapped_by_config_errors_name_the_field(wrapped_by: dict[str, object], expected: str) -> None:
    from broker.config import load_config
    from broker.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(
            {"keyring": {"file": "k.json", "wrapped_by": wrapped_by}}, environ={}, base_dir=Path("/tmp")
        )
    assert "keyring.wrapped_by" in caught.value.message and expected in caught.value.message


def test_a_pin_env_that_is_not_set_is_named(tmp_path: Path) -> None:
    from broker.config import load_config
    from broker.crypto.keysource import key_source_for

    config = load_config(
        {
            "keyring": {
                "file": "k.json",
                "wrapped_by": {
                    "type": "pkcs11",
                    "module": "/m.so",
                    "token_label": "t",
                    "key_label": "k",
                    "pin_env": "NOPE_PIN",
                },
            }
        },
        environ={},
        base_dir=tmp_path,
    )
    with pytest.raises(KeyringError, match="pin_env: NOPE_PIN is not set"):
        key_source_for(config.keyring, {})
