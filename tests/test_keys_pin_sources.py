"""The PKCS#11 PIN as operators really deliver it, against a real SoftHSM2 token: a PIN file saved
with a UTF-8 byte order mark (Windows Notepad, PowerShell ``Out-File -Encoding utf8``) or CRLF line
end, and a PIN environment variable with a trailing newline (a Kubernetes Secret made with
``kubectl create secret --from-file`` from a file ending in a newline). Each must open the token:
the token counts every refused PIN, and a real HSM locks the user PIN after a few, so a broker in
a restart loop with a PIN it mangled would lock the token for every replica."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.config import Pkcs11RootKeyConfig
from broker.crypto.keyring import Keyring, new_key_entry
from broker.crypto.wrapped import WrappedKeyringFile
from tests.rootkeys import PIN_ENV, SOFTHSM_MODULE, TOKEN_LABEL, SoftHsmRoot


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsmRoot:
    root = SoftHsmRoot(tmp_path, monkeypatch)
    from broker.crypto.sources import pkcs11 as source

    # This process may have loaded the module for another test's token folder: read this one's.
    source._library(SOFTHSM_MODULE).reinitialize()
    return root


def _opens(hsm: SoftHsmRoot, tmp_path: Path, **pin: object) -> None:
    from broker.crypto.sources.pkcs11 import Pkcs11RootKey

    config = Pkcs11RootKeyConfig.model_validate(
        {
            "type": "pkcs11",
            "module": SOFTHSM_MODULE,
            "token_label": TOKEN_LABEL,
            "key_label": hsm.label,
            **pin,
        }
    )
    root = Pkcs11RootKey.from_config(config, os.environ)
    ring = WrappedKeyringFile(tmp_path / "keyring.json", root, 0)
    keyring = Keyring([new_key_entry("primary")])
    ring.save(keyring)
    assert ring.load().materials() == keyring.materials()


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(lambda pin: b"\xef\xbb\xbf" + pin.encode(), id="bom"),
        pytest.param(lambda pin: b"\xef\xbb\xbf" + pin.encode() + b"\r\n", id="bom-crlf"),
        pytest.param(lambda pin: pin.encode() + b"\r\n", id="crlf"),
        pytest.param(lambda pin: pin.encode() + b"\n", id="lf"),
    ],
)
def test_a_pin_file_from_any_editor_opens_the_token(
    hsm: SoftHsmRoot, tmp_path: Path, encoded: object
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(encoded(hsm.pin))  # type: ignore[operator]
    pin_file.chmod(0o600)
    _opens(hsm, tmp_path, pin_file=pin_file)


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_a_pin_variable_with_a_trailing_newline_opens_the_token(
    hsm: SoftHsmRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    monkeypatch.setenv(PIN_ENV, hsm.pin + ending)
    _opens(hsm, tmp_path, pin_env=PIN_ENV)
