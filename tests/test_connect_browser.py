"""Hosted connect in a real browser (issue 16, item 2): headless Chromium through Selenium.

The browser opens the broker's /start link, goes through the loopback authorization server's
login page (tests/authserver.py, ``login_page``), comes back through the broker's /callback and
lands on the application's page (tests/hosted.py). Selenium calls block, so they run in worker
threads while the broker serves on the test's event loop. A screenshot of each return page is
written to the test's output folder (printed, see tests/browser.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests import leakcheck
from tests.authserver import AuthServer
from tests.browser import Browsers, browsers, output_folder
from tests.conftest import UPSTREAM, Broker, BrokerFactory
from tests.hosted import LandingPage, hosted_broker, landing_page


@pytest.fixture
def landing() -> Iterator[LandingPage]:
    yield from landing_page()


@pytest.fixture(scope="module")
def chromium_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browsers]:
    """Browsers started once for the module (a start-up takes seconds on a loaded machine)."""
    yield from browsers(tmp_path_factory.mktemp("chromium"))


@pytest.fixture
def chromium(chromium_pool: Browsers) -> Iterator[Browsers]:
    """Each test's browsers start with no cookie at all."""
    try:
        yield chromium_pool
    finally:
        chromium_pool.reset()


@pytest.fixture
def shots(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Path:
    """The test's screenshot folder, named in the test log whatever the capture setting."""
    folder = output_folder(request.node.name)
    with capsys.disabled():
        print(f"\n{request.node.name}: screenshots in {folder}")
    return folder


async def _broker(make_broker: BrokerFactory, auth_server: AuthServer, landing: LandingPage) -> Broker:
    auth_server.login_page = True
    broker = await hosted_broker(make_broker, auth_server, landing, path="/connect")
    start_flow = broker.start_flow

    async def start_and_note(*args: Any, **kwargs: Any) -> Any:
        started = await start_flow(*args, **kwargs)
        leakcheck.add_secret(*parse_qs(urlsplit(started.authorization_url).query)["flow"])
        return started

    broker.start_flow = start_and_note  # type: ignore[method-assign]
    return broker


def _text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


async def _open(driver: Any, url: str) -> None:
    await asyncio.to_thread(driver.get, url)


async def _log_in(driver: Any, user: str, *, allow: bool = True) -> None:
    """On the authorization server's page: type the user name, press Allow or Deny."""
    from selenium.webdriver.common.by import By

    def act() -> None:
        driver.find_element(By.NAME, "login_hint_user").send_keys(user)
        driver.find_element(By.ID, "allow" if allow else "deny").click()

    await asyncio.to_thread(act)


async def _landed(driver: Any, landing: LandingPage, shots: Path, name: str) -> dict[str, str]:
    """Wait for the application's page; screenshot it; its query."""

    def wait() -> str:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 20).until(lambda d: str(d.current_url).startswith(landing.url))
        return str(driver.current_url)

    url = await asyncio.to_thread(wait)
    path = shots / f"{name}.png"
    assert await asyncio.to_thread(driver.save_screenshot, str(path))
    print(f"screenshot: {path}")
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def _screenshot(driver: Any, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    assert await asyncio.to_thread(driver.save_screenshot, str(path))
    print(f"screenshot: {path}")


async def test_whole_flow_in_a_browser_then_resolve(
    make_broker: BrokerFactory,
    auth_server: AuthServer,
    landing: LandingPage,
    chromium: Browsers,
    shots: Path,
) -> None:
    broker = await _broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    driver = await asyncio.to_thread(chromium.new)
    await _open(driver, started.authorization_url)
    assert "Sign in" in await asyncio.to_thread(_text, driver)
    await _log_in(driver, "alice")
    done = await _landed(driver, landing, shots, "connected")
    assert done == {"upstream": UPSTREAM, "status": "connected"}
    assert "status: connected" in await asyncio.to_thread(_text, driver)
    # The browser keeps no binding cookie, and the page it came through showed no secret.
    cookies = await asyncio.to_thread(driver.get_cookies)
    assert [c for c in cookies if c["name"] == "credential_broker_connect"] == []
    resolved = await broker.resolve("alice")
    assert auth_server.access_token_info(resolved.access_token)["user"] == "alice"  # type: ignore[index]
    assert int(broker.query("SELECT COUNT(*) FROM pending_flows")[0][0]) == 0


async def test_another_browser_opening_the_callback_is_refused(
    make_broker: BrokerFactory,
    auth_server: AuthServer,
    landing: LandingPage,
    chromium: Browsers,
    shots: Path,
) -> None:
    broker = await _broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    alice, mallory = await asyncio.gather(asyncio.to_thread(chromium.new), asyncio.to_thread(chromium.new))
    await _open(alice, started.authorization_url)
    # The authorization server's answer for alice, taken before her browser follows it.
    authorize = str(await asyncio.to_thread(lambda: alice.current_url))
    callback = await asyncio.to_thread(auth_server.authorize, authorize, "alice")
    leakcheck.add_secret(callback["code"])
    location = auth_server.redirects[-1]
    await _open(mallory, location)
    body = await asyncio.to_thread(_text, mallory)
    await _screenshot(mallory, shots, "refused")
    assert "could not be matched to this browser" in body
    assert callback["code"] not in body and callback["state"] not in body
    assert auth_server.token_requests() == []
    assert int(broker.query("SELECT COUNT(*) FROM credentials")[0][0]) == 0
    # Alice's own browser still completes her flow with that very answer.
    await _open(alice, location)
    done = await _landed(alice, landing, shots, "owner-connected")
    assert done["status"] == "connected"
    assert (await broker.resolve("alice")).access_token


async def test_deny_in_a_browser(
    make_broker: BrokerFactory,
    auth_server: AuthServer,
    landing: LandingPage,
    chromium: Browsers,
    shots: Path,
) -> None:
    broker = await _broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    driver = await asyncio.to_thread(chromium.new)
    await _open(driver, started.authorization_url)
    await _log_in(driver, "alice", allow=False)
    done = await _landed(driver, landing, shots, "denied")
    assert done == {"upstream": UPSTREAM, "status": "denied", "reason": "access_denied"}
    assert int(broker.query("SELECT COUNT(*) FROM credentials")[0][0]) == 0
    assert int(broker.query("SELECT COUNT(*) FROM pending_flows")[0][0]) == 0


async def test_expired_flow_in_a_browser(
    make_broker: BrokerFactory,
    auth_server: AuthServer,
    landing: LandingPage,
    chromium: Browsers,
    shots: Path,
) -> None:
    broker = await _broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    driver = await asyncio.to_thread(chromium.new)
    await _open(driver, started.authorization_url)
    broker.clock.advance(601)  # the user took too long on the login page
    await _log_in(driver, "alice")
    done = await _landed(driver, landing, shots, "expired")
    assert done == {"upstream": UPSTREAM, "status": "failed", "reason": "flow_expired"}
    assert auth_server.token_requests() == []
    assert int(broker.query("SELECT COUNT(*) FROM credentials")[0][0]) == 0
    # The used link cannot be started again either.
    await _open(driver, started.authorization_url)
    await _screenshot(driver, shots, "link-used")
    assert "no longer valid" in await asyncio.to_thread(_text, driver)


async def test_replayed_callback_in_a_browser(
    make_broker: BrokerFactory,
    auth_server: AuthServer,
    landing: LandingPage,
    chromium: Browsers,
    shots: Path,
) -> None:
    broker = await _broker(make_broker, auth_server, landing)
    started = await broker.start_flow("alice")
    driver = await asyncio.to_thread(chromium.new)
    await _open(driver, started.authorization_url)
    await _log_in(driver, "alice")
    assert (await _landed(driver, landing, shots, "connected"))["status"] == "connected"
    token = (await broker.resolve("alice")).access_token
    await _open(driver, auth_server.redirects[-1])  # the callback URL again, same browser
    await _screenshot(driver, shots, "replayed")
    assert "could not be matched to this browser" in await asyncio.to_thread(_text, driver)
    assert len(auth_server.token_requests()) == 1
    assert (await broker.resolve("alice")).access_token == token


def test_a_missing_browser_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.browser as browser

    monkeypatch.setattr(browser, "CHROMIUM_CANDIDATES", ("/nonexistent/chromium",))
    monkeypatch.setattr(browser, "DRIVER_CANDIDATES", ("/nonexistent/chromedriver",))
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="a real browser is required in CI"):
        browser.chromium_paths()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium and chromium-driver not installed"):
        browser.chromium_paths()
