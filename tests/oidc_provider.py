"""A real OpenID provider for integration tests: the ``oidc-provider`` npm package on loopback.

:class:`OidcProvider` starts ``node tests/oidc/provider.mjs PORT`` with clients whose secrets are
generated here at run time, waits for its "ready" line, and drives its development login and
consent pages the way a browser would (``authorize``), by posting their forms with httpx until
the provider redirects to the client's redirect_uri. It also speaks to the provider's own
endpoints the way a resource server or an attacker would: RFC 7662 introspection, RFC 7009
revocation and a direct refresh_token grant.

``ensure_installed`` runs ``npm ci --prefix tests/oidc`` the first time, so the README's one test
command works on a fresh checkout; CI installs it beforehand (.ci/run).
"""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from tests import leakcheck

HERE = Path(__file__).parent / "oidc"
SCRIPT = HERE / "provider.mjs"
MODULES = HERE / "node_modules" / "oidc-provider"
REDIRECT_URI = "https://app.test/callback"


class ProviderUnavailable(Exception):
    """The provider cannot run on this machine (no node, or its package is not installed)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


_install_lock = threading.Lock()


def ensure_installed() -> None:
    """Install the pinned provider package (package-lock.json) once if it is missing or is not
    the version package.json pins."""
    with _install_lock:
        if _installed_version() == _pinned_version():
            return
        npm, node = shutil.which("npm"), shutil.which("node")
        if npm is None or node is None:
            raise ProviderUnavailable("node and npm are needed to run the oidc-provider tests")
        try:
            done = subprocess.run(
                [npm, "ci", "--prefix", str(HERE), "--no-audit", "--no-fund"],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ProviderUnavailable("npm ci --prefix tests/oidc did not finish in 300 s") from None
        if done.returncode != 0 or _installed_version() != _pinned_version():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ProviderUnavailable(f"npm ci --prefix tests/oidc failed: {' | '.join(tail)}")


def _pinned_version() -> str:
    return str(json.loads((HERE / "package.json").read_text())["dependencies"]["oidc-provider"])


def _installed_version() -> str | None:
    try:
        return str(json.loads((MODULES / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@dataclass(frozen=True)
class OidcClient:
    """One confidential client registered with the provider (client_secret_basic)."""

    client_id: str
    client_secret: str
    # The provider issues this client a refresh token on every code grant, offline_access or not.
    always_refresh: bool = False
    redirect_uri: str = REDIRECT_URI
    # With a public JWK set the client authenticates with private_key_jwt (no secret is used).
    jwks: dict[str, Any] | None = None
    # Its authorization requests must be pushed (RFC 9126).
    require_par: bool = False

    def auth(self) -> tuple[str, str]:
        return (self.client_id, self.client_secret)


@dataclass
class OidcProvider:
    """A running ``oidc-provider`` process and the clients registered with it."""

    clients: list[OidcClient]
    port: int = 0
    process: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    output: list[str] = field(default_factory=list)
    #: Every token and code the provider minted, by kind (the leak check looks for each).
    minted: dict[str, list[str]] = field(default_factory=dict)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    @property
    def introspection_endpoint(self) -> str:
        return self.issuer + "/token/introspection"

    @property
    def revocation_endpoint(self) -> str:
        return self.issuer + "/token/revocation"

    @classmethod
    def start(
        cls,
        n_clients: int = 4,
        n_always_refresh: int = 1,
        timeout: float = 30.0,
        extra_clients: tuple[OidcClient, ...] = (),
    ) -> OidcProvider:
        ensure_installed()
        node = shutil.which("node")
        if node is None:
            raise ProviderUnavailable("node is needed to run the oidc-provider tests")
        clients = [
            OidcClient(f"broker-{i}-{secrets.token_hex(4)}", secrets.token_urlsafe(32), i < n_always_refresh)
            for i in range(n_always_refresh + n_clients)
        ] + list(extra_clients)
        leakcheck.add_secret(*(c.client_secret for c in clients))
        provider = cls(clients)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            provider.port = int(s.getsockname()[1])
        env = {
            **os.environ,
            "OIDC_CLIENTS": json.dumps(
                [
                    {
                        "client_id": c.client_id,
                        "client_secret": c.client_secret,
                        "redirect_uri": c.redirect_uri,
                        "always_refresh": c.always_refresh,
                        "jwks": c.jwks,
                        "require_par": c.require_par,
                    }
                    for c in clients
                ]
            ),
            "OIDC_COOKIE_KEY": secrets.token_urlsafe(32),
        }
        provider.process = subprocess.Popen(
            [node, str(SCRIPT), str(provider.port)],
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        provider.reader = threading.Thread(target=provider._pump, args=(ready,), daemon=True)
        provider.reader.start()
        if not ready.wait(timeout) or provider.process.poll() is not None:
            provider.stop()
            raise RuntimeError("oidc-provider did not start: " + " | ".join(provider.output[-5:]))
        return provider

    def secrets(self) -> list[str]:
        """Every secret this provider knows: client secrets, and each token and code it minted."""
        return [c.client_secret for c in self.clients] + [
            v for kind in list(self.minted.values()) for v in kind
        ]

    def client(self, *, always_refresh: bool = False, index: int = 0) -> OidcClient:
        """The ``index``-th registered client of that refresh policy."""
        return [c for c in self.clients if c.always_refresh is always_refresh and c.jwks is None][index]

    def _pump(self, ready: threading.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("minted "):
                _, kind, value = line.split()
                self.minted.setdefault(kind, []).append(value)
                continue
            self.output.append(line.rstrip())
            if line.startswith("ready "):
                ready.set()
        ready.set()  # exited: let start() see it

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    # -- what a browser does -------------------------------------------------------------

    def authorize(self, authorization_url: str, login: str, max_steps: int = 20) -> dict[str, str]:
        """Open the authorization URL, sign in as ``login`` and consent, and return the query of
        the redirect to the client's redirect_uri (``code``, ``state``, ``iss``, or ``error``).
        Every URL visited is on the provider: the callback itself is never fetched."""
        if not authorization_url.startswith(self.issuer + "/"):
            raise AssertionError("the authorization URL is not the provider's")
        with httpx.Client(follow_redirects=False, trust_env=False, timeout=10) as browser:
            response = browser.get(authorization_url)
            for _ in range(max_steps):
                if response.status_code in (302, 303):
                    location = urljoin(str(response.url), response.headers["location"])
                    if location.startswith(REDIRECT_URI):
                        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
                        if "code" in query:
                            leakcheck.add_secret(query["code"])
                        return query
                    if not location.startswith(self.issuer + "/"):
                        raise AssertionError("the provider redirected off the provider")
                    response = browser.get(location)
                    continue
                if response.status_code == 200 and "<form" in response.text:
                    action, fields = _form(response.text)
                    if fields.get("prompt") == "login":
                        fields.update(login=login, password="any password")
                    response = browser.post(urljoin(str(response.url), action), data=fields)
                    continue
                raise AssertionError(f"unexpected page from the provider: HTTP {response.status_code}")
        raise AssertionError("the provider never redirected to the redirect_uri")

    # -- what a resource server or an attacker does --------------------------------------

    def introspect(self, client: OidcClient, token: str) -> dict[str, Any]:
        """RFC 7662: the provider's view of a token (``active`` true or false)."""
        response = httpx.post(
            self.introspection_endpoint, data={"token": token}, auth=client.auth(), trust_env=False
        )
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def refresh(self, client: OidcClient, refresh_token: str) -> httpx.Response:
        """A refresh_token grant sent straight to the provider (RFC 6749 section 6)."""
        return httpx.post(
            self.token_endpoint,
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=client.auth(),
            trust_env=False,
        )


def _form(page: str) -> tuple[str, dict[str, str]]:
    """The first form's action and its hidden inputs."""
    form = re.search(r"<form[^>]*action=\"([^\"]*)\"[^>]*>(.*?)</form>", page, re.S)
    if form is None:
        raise AssertionError("no form on the provider's page")
    fields = {
        html.unescape(name): html.unescape(value)
        for name, value in re.findall(
            r"<input[^>]*type=\"hidden\"[^>]*name=\"([^\"]*)\"[^>]*value=\"([^\"]*)\"", form.group(2)
        )
    }
    return html.unescape(form.group(1)), fields
