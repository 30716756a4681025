"""The demo page in a real browser (headless Chromium driven by Playwright),
through the README's own commands: ``wsrelay demo`` shows a WebSocket, and
``RELAY_WS_PATHS=/elsewhere wsrelay demo`` (upgrades refused where the page
opens its socket) shows the polling fallback (README: "Long polling, the
fallback").

Chromium is Debian's package (``apt-get install chromium``, in .ci/run);
CHROMIUM overrides the path.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.support.relay import Demo
from tests.support.scrape import metric

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def playwright():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (README, Development)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    yield b
    b.close()


def visit(browser, url: str, shot, also: str = "true") -> tuple[str, int, str]:
    """Open ``url`` and wait for 4 messages received (and the JS condition ``also``)."""
    page = browser.new_page()
    try:
        page.goto(url, timeout=15000)
        page.wait_for_function(f"Number(document.getElementById('received').textContent) >= 4 && ({also})",
                               timeout=20000)
        page.screenshot(path=str(shot))
        return (page.inner_text("#mode"), int(page.inner_text("#received")), page.inner_text("#log"))
    finally:
        page.close()


def test_page_uses_websocket_with_the_demo_as_shipped(browser, tmp_path):
    """README: `wsrelay demo`, then open the page."""
    with Demo("--port", "0") as demo:
        demo.wait_ready()
        mode, received, log = visit(browser, demo.url("page"), tmp_path / "websocket.png")
        upgraded = metric(demo.url("metrics"), "wsrelay_websocket_upgrades_total", outcome="upgraded")
    assert mode == "websocket"
    assert received >= 4 and "ws: hello 1" in log
    assert (tmp_path / "websocket.png").stat().st_size > 1000
    assert upgraded >= 2  # the demo's own round trip and the page's socket


def test_page_falls_back_to_polling_when_upgrade_is_refused(browser, tmp_path):
    """README: `RELAY_WS_PATHS=/elsewhere wsrelay demo` (the page then says "polling")."""
    with Demo("--port", "0", env={"RELAY_WS_PATHS": "/elsewhere"}) as demo:
        demo.wait_ready()
        mode, received, log = visit(browser, demo.url("page"), tmp_path / "polling.png",
                                    also="document.getElementById('log').textContent.includes('server tick')")
        forbidden = metric(demo.url("metrics"), "wsrelay_websocket_upgrades_total", outcome="forbidden")
        ok = metric(demo.url("metrics"), "wsrelay_http_requests_total", code="200")
    assert mode == "polling"
    assert received >= 4 and "poll: hello 1" in log and "poll: server tick" in log
    assert forbidden >= 1  # the page's upgrade on /ws, refused by RELAY_WS_PATHS
    assert ok >= 4  # the page and its polls, relayed as plain HTTP


def test_page_over_https_and_wss_with_the_demos_throwaway_ca(playwright, tmp_path):
    """README: `wsrelay demo --tls`, then open the https:// page, the throwaway CA trusted
    the way Chromium on Linux trusts a CA: in the user's NSS database (certutil,
    Debian's libnss3-tools). No certificate error is ignored: an untrusted chain
    would fail the navigation."""
    if not shutil.which("certutil"):
        pytest.fail("no certutil: apt-get install libnss3-tools (README, Development)")
    import subprocess

    with Demo("--port", "0", "--tls") as demo:
        demo.wait_ready()
        m = re.search(r"open (https://\S+) for the page over TLS, trusting the throwaway CA (\S+)", demo.text())
        assert m, demo.text()
        page_url, ca = m.group(1), m.group(2)
        nssdb = tmp_path / "home" / ".pki" / "nssdb"
        nssdb.mkdir(parents=True)
        subprocess.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True)
        subprocess.run(["certutil", "-A", "-d", f"sql:{nssdb}", "-t", "C,,", "-n", "wsrelay-demo", "-i", ca],
                       check=True)
        b = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                       env={**os.environ, "HOME": str(tmp_path / "home")})
        try:
            mode, received, log = visit(b, page_url, tmp_path / "tls.png")
        finally:
            b.close()
        handshakes = metric(demo.url("metrics"), "wsrelay_tls_handshakes_total")
        failed = sum(metric(demo.url("metrics"), "wsrelay_tls_handshakes_total", outcome=o)
                     for o in ("failed_protocol", "failed_cipher", "failed_other", "failed_sni"))
    assert page_url.startswith("https://localhost:")
    assert mode == "websocket" and received >= 4 and "ws: hello 1" in log
    assert handshakes >= 2 and failed == 0  # the demo's own wss round trip and the browser's
