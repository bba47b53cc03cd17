"""A real browser on another origin: the React `useStream` hook re-joins a run after a page reload.

A chat UI on its own host streams a run through the gateway with the official `useStream` hook
(`@langchain/langgraph-sdk` React, `reconnectOnMount`). The page is reloaded mid-run; the hook
then re-joins the run with `GET /threads/{tid}/runs/{rid}/stream` (`Last-Event-ID: -1`), which
the gateway serves from its log. That answer is a cross-origin response the gateway makes itself,
so it must carry the upstream's CORS headers like every forwarded one: without them the browser
blocks it, the hook fails with "Failed to fetch" and the page ends empty.

Headless Debian Chromium (/usr/bin/chromium, installed by tests/run.sh) driven by Playwright; the
page (tests/js/browser/) is bundled with esbuild from tests/js/node_modules and served by a
small aiohttp server on its own port, against the gateway in front of a real `langgraph dev`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable
from urllib.parse import urlencode, urlsplit

import pytest
from aiohttp import web

if TYPE_CHECKING:
    from playwright.async_api import Browser, ConsoleMessage, Error as PageError, Page, Response

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[1]
JS_DIR = REPO / "tests" / "js"
APP_DIR = JS_DIR / "browser"
ESBUILD = JS_DIR / "node_modules" / ".bin" / "esbuild"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

N = 20          # custom events the run emits
DELAY = 0.2     # seconds between them: the run lasts about 4 s, the reload comes after the 3rd
RUN_STREAM = re.compile(r"^/threads/(?P<tid>[^/]+)/runs/(?P<rid>[^/]+)/stream$")


def _bundle_skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    for need in (ESBUILD, JS_DIR / "node_modules" / "react-dom", JS_DIR / "node_modules" / "@langchain" / "langgraph-sdk"):
        if not need.exists():
            return f"{need.relative_to(REPO)} is missing: run `npm ci` in tests/js"
    return None


# The page is bundled against each SDK the JS tests cover: 2.0.0 was pinned first (npm marks it
# deprecated); 1.15.0 is what `npm install` gives (latest tag), an alias in tests/js/package.json.
SDKS = {"sdk-2.0.0": "@langchain/langgraph-sdk", "sdk-latest-1.15.0": "@langchain/langgraph-sdk-latest"}


@pytest.fixture(scope="module", params=list(SDKS))
def page_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """tests/js/browser bundled by esbuild against one SDK: index.html and app.js in a fresh directory."""
    reason = _bundle_skip_reason()
    package = SDKS[request.param]
    if reason is None and not (JS_DIR / "node_modules" / package).is_dir():
        reason = f"tests/js/node_modules/{package} is missing: run `npm ci` in tests/js"
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("page")
    shutil.copy(APP_DIR / "index.html", out / "index.html")
    proc = subprocess.run(
        [str(ESBUILD), str(APP_DIR / "app.jsx"), "--bundle", "--format=esm", "--platform=browser",
         "--jsx=automatic", '--define:process.env.NODE_ENV="production"', "--log-level=warning",
         f"--alias:@langchain/langgraph-sdk={package}", f"--metafile={out / 'meta.json'}",
         f"--outfile={out / 'app.js'}"],
        cwd=JS_DIR, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"esbuild failed:\n{proc.stderr}"
    inputs = json.loads((out / "meta.json").read_text())["inputs"]
    assert any(f"node_modules/{package}/" in path for path in inputs), f"the page is not built on {package}"
    assert not any(f"node_modules/{other}/" in path for path in inputs for other in SDKS.values() if other != package)
    return out


@pytest.fixture
async def page_origin(page_dir: Path) -> AsyncIterator[str]:
    """The page's own origin: a static server on 127.0.0.1, another port than the gateway's."""
    async def index(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(page_dir / "index.html")

    async def bundle(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(page_dir / "app.js", headers={"Content-Type": "text/javascript"})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/app.js", bundle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    """Debian's headless Chromium under Playwright, with a fresh profile. Never `playwright install`."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: tests/run.sh installs it with `apt-get install chromium`")
    async_api = pytest.importorskip("playwright.async_api", reason="the `playwright` package is not installed")
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                           timeout=30_000)
        try:
            yield browser
        finally:
            await browser.close()


async def _page_state(page: Page) -> dict[str, Any]:
    text = await page.text_content("#state", timeout=5_000)
    state: dict[str, Any] = json.loads(text or "null")
    return state


async def _wait_state(page: Page, done: Callable[[dict[str, Any]], bool], what: str, console: list[str],
                      timeout: float = 15.0) -> dict[str, Any]:
    """Poll the page's state until ``done``; fail at once when the page shows an error."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = await _page_state(page)
        if state.get("error") or state.get("errors"):
            pytest.fail(f"waiting for {what}, the page shows an error: {state.get('error')!r} "
                        f"(onError: {state.get('errors')})\nbrowser console:\n" + "\n".join(console))
        if done(state):
            return state
        await asyncio.sleep(0.1)
    pytest.fail(f"no {what} within {timeout:g} s; page state: {json.dumps(state)[:2000]}\n"
                "browser console:\n" + "\n".join(console))


async def test_usestream_rejoin_after_reload_on_another_origin(lg_gateway: Any, page_origin: str,
                                                               chromium: Browser) -> None:
    assert urlsplit(page_origin).port != urlsplit(lg_gateway.url).port, "the page must be cross-origin"
    context = await chromium.new_context()
    context.set_default_timeout(10_000)
    page = await context.new_page()
    console: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        console.append(f"{msg.type}: {msg.text}")

    def on_page_error(exc: PageError) -> None:
        console.append(f"pageerror: {exc}")

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    # Every GET of a run's stream at the gateway (the hook's re-join), with its response status.
    joins: list[tuple[str, int]] = []

    def on_response(resp: Response) -> None:
        url = urlsplit(resp.url)
        if resp.request.method == "GET" and url.netloc == urlsplit(lg_gateway.url).netloc \
                and RUN_STREAM.match(url.path):
            joins.append((url.path, resp.status))

    page.on("response", on_response)
    try:
        query = urlencode({"api": lg_gateway.url, "n": N, "delay": DELAY})
        await page.goto(f"{page_origin}/?{query}", wait_until="load")
        await page.click("#start")

        # Live through the gateway (the POST the hook streams from): a few events in, run still going.
        before = await _wait_state(page, lambda s: len(s["custom"]) >= 3, "the first custom events", console)
        assert len(before["custom"]) < N, f"the run ended before the reload; make it longer: {before}"
        tid = before["threadId"]
        assert tid and f"thread={tid}" in page.url, (tid, page.url)
        # The hook stored the run to re-join (it read the run id from the POST's Content-Location).
        rid = await page.evaluate("(tid) => sessionStorage.getItem(`lg:stream:${tid}`)", tid)
        assert rid, "useStream stored no run to re-join: reconnectOnMount did not see the run's id"
        assert not joins, f"no re-join expected before the reload: {joins}"

        await page.reload(wait_until="load")

        # The hook re-joins the run from the gateway's log and ends with the run's final state.
        after = await _wait_state(page, lambda s: s["finished"] and not s["isLoading"],
                                  "final state after the reload", console)
        assert after["threadId"] == tid
        assert joins and joins[0][0] == f"/threads/{tid}/runs/{rid}/stream", joins
        assert all(status == 200 for _, status in joins), joins
        # Last-Event-ID -1: the whole run again, each custom event once, then the final values.
        assert after["custom"] == list(range(N)), after["custom"]
        assert after["values"]["items"] == [*range(N), "done"], after["values"]
        assert after["values"]["messages"][-1]["content"] == f"ticked {N} times", after["values"]
        assert after["error"] is None and after["errors"] == [], after
        # The hook counted the re-join a success: it forgot the run it had stored.
        assert await page.evaluate("(tid) => sessionStorage.getItem(`lg:stream:${tid}`)", tid) is None
        # Nothing blocked on the way.
        blocked = [line for line in console if "CORS" in line or "Failed to fetch" in line]
        assert not blocked, "\n".join(blocked)
    finally:
        await context.close()
