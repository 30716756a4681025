"""The demo page in a real browser (headless Chromium driven by Playwright)
through the real relay: WebSocket when upgrades are allowed on its path, the
long-polling fallback when they are refused (issue 5)."""

from __future__ import annotations

import socket

import pytest

from tests.helpers import Relay

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo_origin(loop_thread):
    from relay.demo_origin import serve_demo

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    future = __import__("asyncio").run_coroutine_threadsafe(serve_demo(sock), loop_thread.loop)
    yield f"127.0.0.1:{port}"
    future.cancel()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def visit(browser, url: str, shot) -> tuple[str, int, str]:
    page = browser.new_page()
    try:
        page.goto(url, timeout=15000)
        page.wait_for_function("Number(document.getElementById('received').textContent) >= 4", timeout=20000)
        page.screenshot(path=str(shot))
        return (page.inner_text("#mode"), int(page.inner_text("#received")), page.inner_text("#log"))
    finally:
        page.close()


def test_page_uses_websocket_when_upgrades_are_allowed(browser, demo_origin, tmp_path):
    with Relay(demo_origin, workers=2, env={"RELAY_WS_PATHS": "/ws"}) as r:
        mode, received, log = visit(browser, f"http://127.0.0.1:{r.port}/", tmp_path / "websocket.png")
    assert mode == "websocket"
    assert received >= 4 and "ws: hello 1" in log
    assert (tmp_path / "websocket.png").stat().st_size > 1000
    assert '"outcome":"upgraded"' in "\n".join(r.access)


def test_page_falls_back_to_long_polling_when_upgrade_is_refused(browser, demo_origin, tmp_path):
    with Relay(demo_origin, workers=2, env={"RELAY_WS_PATHS": "/elsewhere"}) as r:
        mode, received, log = visit(browser, f"http://127.0.0.1:{r.port}/", tmp_path / "long-polling.png")
    assert mode == "long-polling"
    assert received >= 4 and "poll: hello 1" in log
    access = "\n".join(r.access)
    assert '"status":403' in access and '"path":"/lp/poll"' in access
