"""Hosted connect: requests the HTTP server cannot read (an oversized request line or header).

aiohttp answers those itself, before any handler runs, and logs the error with the request's
own bytes in its text: the start of the callback URL (its ``state`` and ``code``) or of the
Cookie header (the browser's binding secret). Its logger had no handler, so Python's last-resort
handler printed that traceback on the broker's stderr, outside the log format and with secrets.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from broker.crypto import generate_keyring_file
from tests.authserver import AuthServer
from tests.brokerproc import ServerProcess
from tests.conftest import upstream_doc
from tests.hosted import free_port

STATE = "S" * 43
CODE = "codesecret" + "c" * 9000
BINDING = "B" * 43


def test_an_oversized_request_leaves_no_secret_in_the_log(tmp_path: Path, auth_server: AuthServer) -> None:
    generate_keyring_file(tmp_path / "keyring.json")
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    client = auth_server.new_client(redirect_uri=public + "/callback")
    config = tmp_path / "broker.yaml"
    document = {
        "listen": ["127.0.0.1:0"],
        "store": {"path": str(tmp_path / "broker.db")},
        "keyring": {"file": str(tmp_path / "keyring.json")},
        "background_refresh": {"enabled": False},
        "upstreams": [upstream_doc(auth_server, client, redirect_uri=None)],
        "connect": {
            "listen": f"127.0.0.1:{port}",
            "public_url": public,
            "return_to": "https://app.test/done",
        },
    }
    config.write_text(yaml.safe_dump(document))
    server = ServerProcess(config, tmp_path / "serve.log")
    try:
        with httpx.Client(timeout=10) as http:
            long_url = http.get(f"{public}/callback?state={STATE}&code={CODE}")
            big_cookie = http.get(
                f"{public}/callback?state={STATE}&code=c",
                headers={"cookie": f"credential_broker_connect={BINDING}; other=" + "y" * 9000},
            )
            assert long_url.status_code == big_cookie.status_code == 400
            # The listener still serves.
            assert http.get(f"{public}/start").status_code == 400
    finally:
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    for secret in (STATE, "codesecret", BINDING):
        assert secret not in log, log
    assert "Traceback" not in log, log
    assert "hosted connect: a request could not be read" in log
