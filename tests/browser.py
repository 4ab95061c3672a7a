"""Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium.

Only the Debian binaries are used: the driver path is given, so Selenium never looks for (or
downloads) a browser or driver of its own. Where they are missing, a test skips locally and
fails in CI (``CI=true``), where .ci/run installs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver",)


def _first(candidates: tuple[str, ...], name: str) -> str | None:
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def chromium_paths() -> tuple[str, str]:
    """(browser, driver), or skip (locally) / fail (CI) when either is missing."""
    browser = _first(CHROMIUM_CANDIDATES, "chromium")
    driver = _first(DRIVER_CANDIDATES, "chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromium-driver", driver)) if path is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"a real browser is required in CI: {reason}")
        pytest.skip(reason)
    assert browser is not None and driver is not None
    return browser, driver


class Browsers:
    """Headless Chromium instances, each with its own profile (own cookies), kept for reuse:
    :meth:`reset` clears every cookie of the instances a test used and hands them back, so
    the next test gets a browser that has never seen the broker, without a new start-up."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._busy: list[Any] = []
        self.binary, self.driver = chromium_paths()

    def new(self) -> Any:
        """A browser with no cookies (a pooled one, or a new one)."""
        with self._lock:
            driver = self._idle.pop() if self._idle else None
        if driver is None:
            driver = self._start()
        with self._lock:
            self._busy.append(driver)
        return driver

    def _start(self) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        # Its own profile folder: two instances on one profile would share one browser (and cookies).
        profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=self._tmp))
        options = webdriver.ChromeOptions()
        options.binary_location = self.binary
        for argument in (
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",  # no network here but loopback: do not try
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--no-default-browser-check",
            "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
            "--window-size=1000,700",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(executable_path=self.driver), options=options)
        driver.set_page_load_timeout(20)
        return driver

    def reset(self) -> None:
        """Clear every cookie (all sites) of the browsers in use and make them idle again; a
        browser that does not answer is dropped."""
        with self._lock:
            busy, self._busy = self._busy, []
        for driver in busy:
            try:
                driver.get("about:blank")
                driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
                assert driver.get_cookies() == []
            except Exception:
                with contextlib.suppress(Exception):
                    driver.quit()
                continue
            with self._lock:
                self._idle.append(driver)

    def quit(self) -> None:
        with self._lock:
            drivers, self._idle, self._busy = [*self._idle, *self._busy], [], []
        for driver in drivers:
            # A browser that already died must not hide the test's result.
            with contextlib.suppress(Exception):
                driver.quit()


def browsers(tmp: Path) -> Iterator[Browsers]:
    found = Browsers(tmp)
    try:
        yield found
    finally:
        found.quit()


def output_folder(test_name: str) -> Path:
    """Where a test's screenshots go: $CREDENTIAL_BROKER_TEST_OUTPUT (default test-output/) /
    browser / the test's name. Printed by the tests that write there."""
    root = Path(os.environ.get("CREDENTIAL_BROKER_TEST_OUTPUT", "test-output"))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in test_name)
    folder = (root / "browser" / safe).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
