"""A KMS root key that exists but cannot be used (disabled, scheduled for deletion) or does not
exist at all (a wrong key id, alias or region), against a real local-kms: start-up stops at once
(no retrying) with one line that says what is wrong with the key and what to do, never the advice
for a keyring wrapped by another root key ("restore the file from a backup"), which would send the
operator to replace a good keyring file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.crypto.keyring import Keyring, new_key_entry
from broker.crypto.wrapped import WrappedKeyringFile
from broker.errors import KeyringError, RootKeyRefused, RootKeyUnavailable
from tests.rootkeys import ALIAS, REGION, LocalKms


@pytest.fixture
def kms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalKms]:
    server = LocalKms(tmp_path, monkeypatch)
    try:
        yield server
    finally:
        server.stop()


def _wrapped_keyring(kms: LocalKms, path: Path) -> None:
    from broker.crypto.sources.aws_kms import AwsKmsRootKey

    WrappedKeyringFile(path, AwsKmsRootKey(ALIAS, REGION, kms.endpoint)).save(
        Keyring([new_key_entry("primary")])
    )


def _start_up_error(kms: LocalKms, path: Path, key_id: str = ALIAS) -> KeyringError:
    from broker.crypto.sources.aws_kms import AwsKmsRootKey

    sleeps: list[float] = []
    ring = WrappedKeyringFile(
        path, AwsKmsRootKey(key_id, REGION, kms.endpoint), 30, sleep=sleeps.append, monotonic=lambda: 0.0
    )
    with pytest.raises(KeyringError) as caught:
        ring.load()
    assert sleeps == []  # the operator must act: never retried for 30 s
    message = caught.value.message
    assert "\n" not in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert os.environ["AWS_ACCESS_KEY_ID"] not in message
    return caught.value


def test_a_disabled_root_key_is_named_as_disabled(kms: LocalKms, tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    _wrapped_keyring(kms, path)
    kms.client().disable_key(KeyId=kms.key)
    error = _start_up_error(kms, path)
    assert not isinstance(error, RootKeyRefused | RootKeyUnavailable)
    assert "disabled" in error.message and "enable" in error.message
    assert "restore the file from a backup" not in error.message


def test_a_root_key_scheduled_for_deletion_is_named_as_such(kms: LocalKms, tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    _wrapped_keyring(kms, path)
    kms.client().schedule_key_deletion(KeyId=kms.key, PendingWindowInDays=7)
    error = _start_up_error(kms, path)
    assert not isinstance(error, RootKeyRefused | RootKeyUnavailable)
    assert "deletion" in error.message and "cancel-key-deletion" in error.message
    assert "restore the file from a backup" not in error.message


def test_a_root_key_that_does_not_exist_names_key_id_and_region(kms: LocalKms, tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    _wrapped_keyring(kms, path)
    error = _start_up_error(kms, path, key_id="alias/no-such-root-key")
    assert not isinstance(error, RootKeyRefused | RootKeyUnavailable)
    assert "alias/no-such-root-key" in error.message and REGION in error.message
    assert "not found" in error.message and "key_id" in error.message and "region" in error.message
    assert "restore the file from a backup" not in error.message
