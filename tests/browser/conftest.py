"""Fixtures for tests that drive the real dashboard over HTTP against the session's real farm.

- ``chromium_path``: Debian's chromium (``which chromium``). Where it is missing, CI (CI=true) or a root shell
  installs it with apt-get; elsewhere the browser tests are skipped with the reason. Never
  ``playwright install``: it downloads a browser build, which this network does not allow.
- ``live_server``: the Flask app from ``web.create_app()`` served by werkzeug on a free loopback port in a
  thread of this process. It reads the FARM_* variables tests/conftest.py set, so it shares the session's
  database, artifact store and broker with the ``stack`` fixture's real workers.
- ``browser`` / ``page``: Playwright's Chromium launched from that binary, headless, with the flags that keep
  it from reaching for the network; ``shot`` saves a full-page screenshot under test-artifacts/browser/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
APT_TIMEOUT_S = 900


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                          check=False)


def install_chromium() -> str | None:
    """apt-get update, then install chromium; returns why it failed, or None."""
    if not shutil.which("apt-get"):
        return "there is no apt-get on this machine"
    for args in (("update", "-q"), ("install", "-y", "-q", "--no-install-recommends", "chromium")):
        try:
            done = _apt(*args)
        except subprocess.TimeoutExpired:
            return f"apt-get {' '.join(args)} ran past {APT_TIMEOUT_S}s"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-800:]
            return f"apt-get {' '.join(args)} exited {done.returncode}: {tail}"
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    in_ci = os.environ.get("CI", "").lower() == "true"
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not (in_ci or as_root):
        pytest.skip("browser tests need Debian's chromium: run `apt-get install -y chromium` as root "
                    "(CI=true or a root shell makes the tests install it themselves)")
    problem = install_chromium()
    found = shutil.which("chromium")
    if found:
        return found
    problem = problem or "apt-get succeeded but `which chromium` finds nothing"
    reason = f"could not install chromium: {problem}"
    if in_ci:
        pytest.fail(reason)  # in CI a missing browser is a broken setup, not a reason to skip silently
    pytest.skip(reason)


@dataclass(frozen=True)
class LiveServer:
    url: str
    app: Any


@pytest.fixture(scope="session")
def live_server(stack: object) -> Iterator[LiveServer]:
    from werkzeug.serving import make_server

    from web import create_app

    app = create_app()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="farm-web-test", daemon=True)
    thread.start()
    try:
        yield LiveServer(f"http://127.0.0.1:{server.server_port}", app)
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    pw = sync_api.sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
    except Exception:
        pw.stop()
        raise
    try:
        yield b
    finally:
        b.close()
        pw.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(30_000)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield p
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the pages: {errors}"


@pytest.fixture
def shot(page: Any, request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """``shot("step")`` saves test-artifacts/browser/<test>-<n>-<step>.png of the whole page."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1, 100))

    def take(step: str) -> Path:
        path = ARTIFACTS / f"{request.node.name}-{next(counter):02d}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
