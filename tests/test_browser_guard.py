"""A real browser stays out: headless Chromium's fetch() from a page on another loopback port.

The page's requests are the ones a hostile page in the pod would make: a GET that carries no
``Origin`` (``no-cors``: only ``Sec-Fetch-Site`` gives it away), a "simple" text/plain POST
to ``/exec`` and a JSON POST to ``/mcp`` (which the browser preflights). Each must reach the
proxy and be refused as a browser request.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from .conftest import RunningProxy
from .test_mcp_http import INITIALIZE, metric, metrics_text

pytestmark = pytest.mark.timeout(90)
REFUSED = 'reason="browser_request"'
PAGE = """<!doctype html><title>hostile page</title><script>
const target = "http://127.0.0.1:%(port)d";
const tries = [
  fetch(target + "/status", {mode: "no-cors"}),
  fetch(target + "/exec", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                           body: JSON.stringify({command: ["touch", %(marker)s]})}),
  fetch(target + "/mcp", {method: "POST", body: %(initialize)s,
                          headers: {"Content-Type": "application/json",
                                    "Accept": "application/json, text/event-stream"}}),
];
Promise.allSettled(tries).then((results) =>
  fetch("/done", {method: "POST", body: JSON.stringify(results.map((r) => r.status))}));
</script>"""


@pytest.fixture
async def hostile_page(proxy: RunningProxy, tmp_path: Path) -> AsyncIterator[tuple[str, asyncio.Future[str]]]:
    """A page on its own loopback port aimed at the proxy; the future is what it reports when done."""
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    page = PAGE % {
        "port": proxy.port,
        "marker": json.dumps(str(tmp_path / "ran")),
        "initialize": json.dumps(json.dumps(INITIALIZE)),
    }

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def finished(request: web.Request) -> web.Response:
        if not done.done():
            done.set_result(await request.text())
        return web.Response()

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_post("/done", finished)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/", done
    finally:
        await runner.cleanup()


async def test_chromium_fetch_from_another_port_is_refused(
    hostile_page: tuple[str, asyncio.Future[str]], proxy: RunningProxy, tmp_path: Path
) -> None:
    """Every request of the page reaches the proxy and is refused; nothing runs."""
    browser = shutil.which("chromium")
    assert browser is not None, "Debian's chromium is needed (.ci/run installs it)"
    url, done = hostile_page
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    process = subprocess.Popen(
        [browser, *flags, f"--user-data-dir={tmp_path / 'profile'}", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        outcomes = json.loads(await asyncio.wait_for(done, 60))
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert len(outcomes) == 3
    async with aiohttp.ClientSession() as http:
        text = await metrics_text(http, proxy)
    # The GET (Sec-Fetch-Site only), the text/plain POST and the /mcp preflight (Origin).
    assert metric(text, "session_proxy_rejections_total", REFUSED) == 3
    assert not (tmp_path / "ran").exists()
