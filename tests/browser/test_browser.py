"""The demo page in a real browser: Debian's Chromium, headless, driven by Playwright.

Each test starts ``python -m sse_handler demo`` as a subprocess and opens its
page; what is checked is what the page's own ``EventSource`` handed to the page
(``window.sseLog``, filled by ``page.html``), what the page shows, and what the
server's admin API lists. Run with ``tox -e browser``; it needs
``/usr/bin/chromium`` (Debian's ``chromium`` package) and never downloads a
browser.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from playwright.async_api import BrowserContext, Page, Request, async_playwright, expect
from redis_server import RedisServer
from support import DemoProcess, free_port, tls_certificate
from tornado.httpclient import AsyncHTTPClient

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "artifacts" / "demo-page.png"
TOKEN = "browser-test-token"

#: Chromium's EventSource waits this long before reconnecting when the server
#: sent no ``retry:`` (blink's ``EventSource::kDefaultReconnectDelay``, 3000 ms);
#: the demo sends none.
DEFAULT_RECONNECT_DELAY = 3.0


# --- the browser, the demo, HTTP --------------------------------------------------------------


@asynccontextmanager
async def chromium(
    profile: Path, *, ignore_https_errors: bool = False
) -> AsyncIterator[BrowserContext]:
    """Debian's Chromium, headless, on a fresh profile (user-data-dir).

    ``ignore_https_errors``: accept a certificate the browser does not trust
    (the tests' own CA is in no trust store Chromium reads).
    """
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: the browser test drives Debian's Chromium; install it "
            "with `apt-get install chromium` (Playwright's own browsers are not used)",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 900, "height": 620},
            ignore_https_errors=ignore_https_errors,
        )
        try:
            yield context
        finally:
            await context.close()


@asynccontextmanager
async def stopped_after(*demos: DemoProcess) -> AsyncIterator[None]:
    """Stops each of the demo processes that was started, whatever state it is in."""
    try:
        yield
    finally:
        await asyncio.gather(*(demo.stop() for demo in demos if demo.proc is not None))


async def http(
    url: str, method: str = "GET", body: bytes | None = None, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await AsyncHTTPClient().fetch(
        url, method=method, body=body, headers=headers, raise_error=False, request_timeout=5
    )
    return response.code, json.loads(response.body) if response.body else None


async def publish(
    demo: DemoProcess, data: str, event: str | None = None, channel: str | None = None
) -> str:
    """POST /publish, as the README's curl does; the id the broker gave the event."""
    fields = {"event": event, "channel": channel}
    query = urlencode({name: value for name, value in fields.items() if value})
    status, body = await http(f"{demo.url}/publish?{query}", "POST", data.encode())
    assert status == 200, body
    event_id: str = body["id"]
    return event_id


async def admin_cids(demo: DemoProcess) -> list[str]:
    status, body = await http(f"{demo.url}/admin/connections", token=TOKEN)
    assert status == 200, body
    return [conn["cid"] for conn in body]


async def wait_for_admin_cids(demo: DemoProcess, expected: list[str], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (cids := await admin_cids(demo)) != expected:
        assert loop.time() < deadline, f"admin API lists {cids}, expected {expected}"
        await asyncio.sleep(0.05)


# --- the page ---------------------------------------------------------------------------------


async def sse_log(page: Page) -> list[dict[str, Any]]:
    """What the page's EventSource handed to it: open, error, the connection's own
    events, and every channel event (unwrapped: its name as ``type``, and ``channel``)."""
    entries: list[dict[str, Any]] = await page.evaluate("window.sseLog")
    return entries


def messages(log: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(entry["id"], entry["data"]) for entry in log if entry["type"] == "message"]


async def wait_for_messages(page: Page, count: int, timeout: float = 5.0) -> None:
    await page.wait_for_function(
        "n => window.sseLog.filter(e => e.type === 'message').length >= n",
        arg=count,
        timeout=timeout * 1000,
    )


async def open_page(page: Page, demo: DemoProcess) -> str:
    """Load the demo page; its connection id, once the welcome event has shown it."""
    await page.goto(demo.url + "/")
    await expect(page.locator("#state")).to_have_text("open")
    await expect(page.locator("#cid")).not_to_have_text("\u2013")  # the placeholder, an en dash
    cid = await page.locator("#cid").text_content()
    assert cid
    return cid


def event_stream_requests(page: Page) -> list[Request]:
    """Every request the page makes for its stream (``/page/events``), as it makes them."""
    seen: list[Request] = []
    page.on(
        "request", lambda r: seen.append(r) if urlsplit(r.url).path == "/page/events" else None
    )
    return seen


@pytest.fixture
def one_redis() -> Iterator[RedisServer]:
    """One engine is enough here: the broker tests cover Redis and Valkey."""
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.close()


# --- the tests --------------------------------------------------------------------------------


def row(entry: dict[str, Any]) -> list[str]:
    """The table row the page shows for one log entry."""
    return [entry["type"], entry["id"], entry["channel"] or "", entry["data"]]


async def wait_for_event(page: Page, event_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The log entry of the channel event with this id, once the page has it."""
    await page.wait_for_function(
        "id => window.sseLog.some(e => e.channel !== null && e.id === id)",
        arg=event_id,
        timeout=timeout * 1000,
    )
    [entry] = [e for e in await sse_log(page) if e["channel"] is not None and e["id"] == event_id]
    return entry


async def test_page_shows_every_event_of_its_channels(tmp_path: Path) -> None:
    demo = DemoProcess("--admin-token", TOKEN)
    async with stopped_after(demo), chromium(tmp_path / "profile") as browser:
        await demo.start()
        page = await browser.new_page()
        requests = event_stream_requests(page)
        cid = await open_page(page, demo)
        assert await admin_cids(demo) == [cid]
        assert await sse_log(page) == [
            {"type": "open", "id": None, "channel": None, "data": None, "readyState": 1},
            {
                "type": "welcome",
                "id": "",
                "channel": None,
                "data": json.dumps({"connection_id": cid}, separators=(",", ":")),
                "readyState": 1,
            },
        ]

        sent = ["first", "two\nlines", "h\u00e9llo \u2713 <b>not bold</b>"]
        ids = [await publish(demo, data) for data in sent]
        await wait_for_messages(page, len(sent))
        assert messages(await sse_log(page)) == list(zip(ids, sent, strict=True))
        newest = page.locator("#events tr").first.locator("td")
        await expect(newest).to_have_text(["message", ids[-1], "default", sent[-1]])

        # A name the page has never heard of, published from outside as the README does.
        greeting_id = await publish(demo, "hello", event="greeting")
        greeting = await wait_for_event(page, greeting_id)
        assert row(greeting) == ["greeting", greeting_id, "default", "hello"]
        await expect(newest).to_have_text(row(greeting))

        # The visitor picks channels: the page reopens its stream on them.
        await page.fill("input[name=channels]", "default, news")
        await page.click("#channels button[type=submit]")
        await expect(page.locator("#stream")).to_have_text(
            "/page/events?channel=default&channel=news"
        )
        await expect(page.locator("#state")).to_have_text("open")
        await page.wait_for_function(
            "old => ![old, '\\u2013'].includes(document.getElementById('cid').textContent)",
            arg=cid,
        )
        new_cid = await page.locator("#cid").text_content()
        assert new_cid
        await wait_for_admin_cids(demo, [new_cid], timeout=5)
        assert [urlsplit(r.url).query for r in requests] == [
            "channel=default",
            "channel=default&channel=news",
        ]

        unread_id = await publish(demo, "not watched", event="other", channel="sports")
        news_id = await publish(demo, "extra!", event="breaking", channel="news")
        news = await wait_for_event(page, news_id)
        assert row(news) == ["breaking", news_id, "news", "extra!"]
        await expect(newest).to_have_text(row(news))

        # The page's own form publishes, to a channel and with a name.
        await page.fill("input[name=data]", "from the form")
        await page.fill("input[name=event]", "note")
        await page.fill("input[name=id]", "form-1")
        await page.fill("input[name=channel]", "news")
        await page.click("#publish button[type=submit]")
        await expect(page.locator("#result")).to_have_text("delivered to 1 connection(s)")
        form = await wait_for_event(page, "form-1")
        assert row(form) == ["note", "form-1", "news", "from the form"]

        log = await sse_log(page)
        assert unread_id not in {e["id"] for e in log}
        channel_events = [e for e in log if e["channel"] is not None]
        assert [e["id"] for e in channel_events] == [*ids, greeting_id, news_id, "form-1"]
        shown = [e for e in log if e["type"] not in ("open", "error")]
        assert await page.locator("#events tr").count() == len(shown)

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=SCREENSHOT, full_page=True)


async def test_page_over_https_shows_a_published_event(tmp_path: Path) -> None:
    # `demo --tls-cert/--tls-key`: the page, its EventSource and /publish all over HTTPS.
    tls = tls_certificate().write_demo_files(tmp_path)
    demo = DemoProcess(tls=tls)
    async with (
        stopped_after(demo),
        chromium(tmp_path / "profile", ignore_https_errors=True) as browser,
    ):
        await demo.start()
        assert demo.url.startswith("https://")
        page = await browser.new_page()
        requests = event_stream_requests(page)
        cid = await open_page(page, demo)
        assert await page.evaluate("location.protocol") == "https:"
        assert [r.url for r in requests] == [f"{demo.url}/page/events?channel=default"]
        log = await sse_log(page)
        assert [e["type"] for e in log] == ["open", "welcome"]
        assert json.loads(log[1]["data"]) == {"connection_id": cid}

        status, published = await demo.publish("over HTTPS \u2713")
        assert (status, published["delivered_to"]) == (200, 1)
        await wait_for_messages(page, 1)
        assert messages(await sse_log(page)) == [(published["id"], "over HTTPS \u2713")]
        newest = page.locator("#events tr").first.locator("td")
        await expect(newest).to_have_text(
            ["message", published["id"], "default", "over HTTPS \u2713"]
        )
        await expect(page.locator("#state")).to_have_text("open")


async def test_admin_stop_closes_the_page_for_good(tmp_path: Path) -> None:
    demo = DemoProcess("--admin-token", TOKEN)
    async with stopped_after(demo), chromium(tmp_path / "profile") as browser:
        await demo.start()
        page = await browser.new_page()
        requests = event_stream_requests(page)
        cid = await open_page(page, demo)
        assert await admin_cids(demo) == [cid]

        status, _ = await http(f"{demo.url}/admin/connections/{cid}", "DELETE", token=TOKEN)
        assert status == 204
        await expect(page.locator("#state")).to_have_text("closed by server")
        assert await page.evaluate("window.sseSource.readyState") == 2  # CLOSED
        log = await sse_log(page)
        assert [e["type"] for e in log] == ["open", "welcome", "close"]

        # A page that ignored `close` would be back after the reconnection delay.
        await wait_for_admin_cids(demo, [], timeout=2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEFAULT_RECONNECT_DELAY + 1.0
        while loop.time() < deadline:
            assert await admin_cids(demo) == []
            await asyncio.sleep(0.25)
        assert len(requests) == 1
        assert await sse_log(page) == log
        assert await page.evaluate("window.sseSource.readyState") == 2


@pytest.mark.timeout(60)
async def test_server_drop_resumes_with_last_event_id(
    tmp_path: Path, one_redis: RedisServer
) -> None:
    # The page's server dies without a word (SIGKILL); events keep being published
    # through another process on the same Redis; the same command starts again on
    # the same port; the browser reconnects by itself with Last-Event-ID.
    served = DemoProcess("--redis", one_redis.url, "--admin-token", TOKEN)
    publisher = DemoProcess("--redis", one_redis.url)
    restarted = copy.copy(served)  # the same command, on the same port, started later
    async with (
        stopped_after(served, publisher, restarted),
        chromium(tmp_path / "profile") as browser,
    ):
        await asyncio.gather(served.start(), publisher.start())
        page = await browser.new_page()
        requests = event_stream_requests(page)
        first_cid = await open_page(page, served)
        before = [f"before {i}" for i in range(3)]
        before_ids = [await publish(publisher, data) for data in before]
        await wait_for_messages(page, len(before))

        assert served.proc is not None
        served.proc.kill()
        await served.proc.wait()
        await expect(page.locator("#state")).to_have_text("reconnecting…")
        during = [f"during {i}" for i in range(5)]
        during_ids = [await publish(publisher, data) for data in during]
        await restarted.start()

        await wait_for_messages(page, len(before) + len(during), timeout=15)
        await expect(page.locator("#state")).to_have_text("open")
        after = [f"after {i}" for i in range(2)]
        after_ids = [await publish(publisher, data) for data in after]
        await wait_for_messages(page, len(before) + len(during) + len(after))

        log = await sse_log(page)
        assert messages(log) == list(
            zip(before_ids + during_ids + after_ids, before + during + after, strict=True)
        )
        assert "reset" not in {e["type"] for e in log}
        welcomes = [json.loads(e["data"])["connection_id"] for e in log if e["type"] == "welcome"]
        assert welcomes[0] == first_cid
        assert len(welcomes) == 2
        assert await admin_cids(restarted) == [welcomes[1]]
        assert [e["type"] for e in log].count("open") == 2

        headers = [await r.all_headers() for r in requests]
        assert "last-event-id" not in headers[0]
        assert len(headers) >= 2
        assert {h.get("last-event-id") for h in headers[1:]} == {before_ids[-1]}
