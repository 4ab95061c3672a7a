"""The HSM token goes away while the broker's process has the PKCS#11 module loaded (a token
removed, an HSM restarted: here a real SoftHSM2 token's store moved away and back) and comes back.
That is an outage to wait out, never "this root key does not unwrap the keyring" (which tells the
operator to restore the keyring file from a backup and is never retried): the start-up retry
waits for the token until ``keyring.unwrap_timeout_seconds``, and once the token is back the same
process opens the keyring again without a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.crypto.keyring import Keyring, new_key_entry
from broker.crypto.wrapped import WrappedKeyringFile
from broker.errors import RootKeyUnavailable
from tests.rootkeys import PIN_ENV, SOFTHSM_MODULE, TOKEN_LABEL, SoftHsmRoot


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsmRoot:
    root = SoftHsmRoot(tmp_path, monkeypatch)
    from broker.crypto.sources import pkcs11 as source

    # This process may have loaded the module for another test's token folder: read this one's.
    source._library(SOFTHSM_MODULE).reinitialize()
    return root


def _ring(hsm: SoftHsmRoot, path: Path, sleep: object, now: list[float]) -> WrappedKeyringFile:
    import os

    from broker.crypto.sources.pkcs11 import Pkcs11RootKey

    root = Pkcs11RootKey(SOFTHSM_MODULE, TOKEN_LABEL, hsm.label, os.environ[PIN_ENV])
    return WrappedKeyringFile(path, root, 10, sleep=sleep, monotonic=lambda: now[0])  # type: ignore[arg-type]


def test_a_token_lost_and_back_is_waited_for_then_opens(hsm: SoftHsmRoot, tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    ring = _ring(hsm, path, sleep, now)
    keyring = Keyring([new_key_entry("primary")])
    ring.save(keyring)  # the module is loaded and has used the token

    hsm.stop()
    with pytest.raises(RootKeyUnavailable) as caught:
        _ring(hsm, path, sleep, now).load()
    assert "pkcs11" in caught.value.message and "unwrap_timeout_seconds" in caught.value.message
    assert sleeps  # retried with backoff, not refused at once

    # The token comes back during the first wait: the same process opens the keyring.
    def sleep_and_return(seconds: float) -> None:
        sleep(seconds)
        if not any(hsm.tokens.iterdir()):
            hsm.start()

    sleeps.clear()
    assert _ring(hsm, path, sleep_and_return, now).load().materials() == keyring.materials()
    assert sleeps == [0.2]
