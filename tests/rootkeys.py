"""Real root-key servers for the wrapped keyring tests: a SoftHSM2 token and a local-kms process.

Each harness owns one root key source for one test: SoftHSM2 with its own ``SOFTHSM2_CONF`` and
token folder under the test's tmp_path, local-kms on a free loopback port with its own data
folder. Keys are generated at run time; the PIN and the AWS secret key are random per test and
given to the leak check. Everything that touches the PKCS#11 library runs in a subprocess, so
each test's ``SOFTHSM2_CONF`` is the one its processes read (the library reads it once per
process).

A missing tool is a skip locally and a failure in CI (``CI=true``), as for PostgreSQL and helm:
.ci/run installs both (scripts/ci/softhsm2.sh, scripts/ci/install-tools.sh).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import leakcheck

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN_LABEL = "credential-broker"
PIN_ENV = "CB_TEST_HSM_PIN"
ALIAS = "alias/credential-broker-root"
REGION = "eu-west-1"


def required() -> bool:
    """In CI a missing SoftHSM2 or local-kms fails the tests instead of skipping them."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(what: str) -> None:
    if required():
        pytest.fail(f"CI: {what} (.ci/run installs it)")
    pytest.skip(what)


def local_kms_binary() -> str | None:
    found = shutil.which("local-kms")
    if found:
        return found
    for folder in (os.environ.get("GOBIN"), str(Path.home() / "go" / "bin")):
        if folder and (Path(folder) / "local-kms").is_file():
            return str(Path(folder) / "local-kms")
    gopath = shutil.which("go")
    if gopath:
        done = subprocess.run(["go", "env", "GOPATH"], capture_output=True, text=True, check=False)
        candidate = Path(done.stdout.strip()) / "bin" / "local-kms"
        if candidate.is_file():
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_HSM_SCRIPT = """
import json, sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
args = json.loads(sys.argv[1])
token = pkcs11.lib(args["module"]).get_token(token_label=args["token"])
with token.open(rw=True, user_pin=args["pin"]) as session:
    if args["op"] == "generate":
        session.generate_key(KeyType.AES, 256, label=args["label"], store=True, template={
            Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True, Attribute.WRAP: True,
            Attribute.UNWRAP: True, Attribute.ENCRYPT: True, Attribute.DECRYPT: True})
    elif args["op"] == "generate-encrypt-only":
        session.generate_key(KeyType.AES, 256, label=args["label"], store=True, template={
            Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True, Attribute.WRAP: False,
            Attribute.UNWRAP: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True})
    elif args["op"] == "destroy":
        session.get_key(label=args["label"], object_class=ObjectClass.SECRET_KEY).destroy()
"""


class SoftHsmRoot:
    """A SoftHSM2 token of this test, with one AES-256 root key (non-extractable)."""

    kind = "pkcs11"

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        if not SOFTHSM_MODULE.exists() or shutil.which("softhsm2-util") is None:
            _missing("SoftHSM2 is not installed (Debian package softhsm2)")
        try:
            import pkcs11  # noqa: F401
        except ImportError:
            _missing("python-pkcs11 is not installed (pip install -e '.[pkcs11]')")
        self.tokens = tmp / "softhsm-tokens"
        self.tokens.mkdir()
        conf = tmp / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
        self.pin = secrets.token_hex(8)
        monkeypatch.setenv(PIN_ENV, self.pin)
        leakcheck.add_secret(self.pin)
        so_pin = secrets.token_hex(8)
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                TOKEN_LABEL,
                "--pin",
                self.pin,
                "--so-pin",
                so_pin,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.label = "root-1"
        self.generate(self.label)
        self._parked = tmp / "softhsm-tokens-away"

    def _run(self, op: str, label: str) -> None:
        args = {
            "module": str(SOFTHSM_MODULE),
            "token": TOKEN_LABEL,
            "pin": self.pin,
            "op": op,
            "label": label,
        }
        done = subprocess.run(
            [sys.executable, "-c", _HSM_SCRIPT, json.dumps(args)], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr[-2000:]

    def generate(self, label: str, *, wrap: bool = True) -> None:
        """A new AES-256 key; ``wrap=False``: one that may only encrypt and decrypt."""
        self._run("generate" if wrap else "generate-encrypt-only", label)

    def wrapped_by(self, label: str | None = None) -> dict[str, Any]:
        return {
            "type": "pkcs11",
            "module": str(SOFTHSM_MODULE),
            "token_label": TOKEN_LABEL,
            "key_label": label or self.label,
            "pin_env": PIN_ENV,
        }

    def other_root(self) -> dict[str, Any]:
        """A second root key on the same token: the wrong one for this keyring."""
        self.generate("root-other")
        return self.wrapped_by("root-other")

    def rotate(self) -> dict[str, Any]:
        """PKCS#11 has no key versions: a new key under a new label is the new root key."""
        self.old_label, self.label = self.label, "root-2"
        self.generate(self.label)
        return self.wrapped_by()

    def retire_old(self) -> None:
        self._run("destroy", self.old_label)

    def stop(self) -> None:
        """The token goes away (an HSM unplugged or unreachable)."""
        self.tokens.rename(self._parked)
        self.tokens.mkdir()

    def start(self) -> None:
        self.tokens.rmdir()
        self._parked.rename(self.tokens)


class LocalKms:
    """A local-kms process on a loopback port, with a symmetric key behind ALIAS."""

    kind = "aws_kms"

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        binary = local_kms_binary()
        if binary is None:
            _missing("local-kms is not installed (scripts/ci/install-tools.sh builds it)")
        try:
            import boto3  # noqa: F401
        except ImportError:
            _missing("boto3 is not installed (pip install -e '.[aws]')")
        assert binary is not None
        self.binary = binary
        self.port = free_port()
        self.data = tmp / "local-kms-data"
        self.data.mkdir()
        self.log_path = tmp / "local-kms.log"
        self.endpoint = f"http://127.0.0.1:{self.port}"
        secret = secrets.token_hex(16)
        leakcheck.add_secret(secret)
        for name, value in {
            "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        }.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        self.key = self.client().create_key()["KeyMetadata"]["KeyId"]
        self.client().create_alias(AliasName=ALIAS, TargetKeyId=self.key)
        self.old_key = self.key

    def start(self) -> None:
        env = {
            **os.environ,
            "PORT": str(self.port),
            "KMS_DATA_PATH": str(self.data),
            "KMS_REGION": REGION,
            "KMS_ACCOUNT_ID": "111122223333",
            "KMS_SEED_PATH": str(self.data / "no-seed.yaml"),
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError("local-kms exited: " + self.log_path.read_text()[-2000:]) from None
                time.sleep(0.05)
        raise AssertionError("local-kms did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> Any:
        import boto3

        return boto3.client("kms", endpoint_url=self.endpoint, region_name=REGION)

    def wrapped_by(self, key_id: str = ALIAS) -> dict[str, Any]:
        return {"type": "aws_kms", "key_id": key_id, "region": REGION, "endpoint_url": self.endpoint}

    def other_root(self) -> dict[str, Any]:
        """Another KMS key the same credentials may use: the wrong one for this keyring."""
        return self.wrapped_by(self.client().create_key()["KeyMetadata"]["KeyId"])

    def rotate(self) -> dict[str, Any]:
        """Manual rotation (local-kms has no on-demand rotation of key material): a new key, and
        the alias the config names moved to it. The config itself does not change."""
        self.old_key = self.key
        self.key = self.client().create_key()["KeyMetadata"]["KeyId"]
        self.client().update_alias(AliasName=ALIAS, TargetKeyId=self.key)
        return self.wrapped_by()

    def retire_old(self) -> None:
        self.client().disable_key(KeyId=self.old_key)


RootServer = SoftHsmRoot | LocalKms


def unwrapped_materials(config: Path) -> list[bytes]:
    """The KEKs of a wrapped keyring, unwrapped in a subprocess (for the leak check only)."""
    script = (
        "import sys, json, base64\n"
        "from pathlib import Path\n"
        "from broker.config import load_config_file\n"
        "from broker.crypto.keysource import key_source_for\n"
        "import os\n"
        "config = load_config_file(Path(sys.argv[1]), environ=os.environ)\n"
        "ring = key_source_for(config.keyring, os.environ).load()\n"
        "print(json.dumps([base64.b64encode(e.material).decode() for e in ring.entries]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import base64

    return [base64.b64decode(m) for m in json.loads(done.stdout)]
