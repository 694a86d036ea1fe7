"""The nginx configurations of docs/proxies.md, run as written by Debian's nginx.

The blocks are read out of the Markdown at test time (the ones marked
``<!-- nginx: http -->`` and ``<!-- nginx: https -->``), their ports and
certificate paths replaced, and wrapped in a minimal ``nginx.conf``; nginx runs
as a child process (not a daemon) under a temporary prefix, in front of
``python -m sse_handler demo``. Chromium (as in test_browser.py) shows what a
page behind it makes of an outage of the Tornado process.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pwd
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from doc_blocks import ROOT, blocks_in
from playwright.async_api import Page
from support import DemoProcess, free_port, tls_certificate
from test_browser import chromium, stopped_after
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from sse_handler.testing import EventStreamClient

NGINX = Path("/usr/sbin/nginx")
CURL = Path("/usr/bin/curl")
PROXIES = ROOT / "docs" / "proxies.md"

#: How long the Tornado process stays away in the outage test: longer than the
#: fallback's retry (2 s) and the browser's default reconnection delay (3 s).
OUTAGE = 8.0


# --- the configuration, from the docs ---------------------------------------------------------


def documented(marker: str) -> str:
    """The one ```nginx block of docs/proxies.md marked ``<!-- {marker} -->``."""
    (block,) = [b for b in blocks_in("nginx", [PROXIES]) if b.marker == marker]
    return block.text


def replaced(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each key replaced by its value; each key must occur exactly once,
    so that a change of the docs fails here instead of testing something else."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"expected {old!r} once in the documented config"
        text = text.replace(old, new)
    return text


def without_line(text: str, needle: str) -> str:
    (line,) = [line for line in text.splitlines(keepends=True) if needle in line]
    return text.replace(line, "")


class Nginx:
    """Debian's nginx in front of the Tornado process on ``upstream_port``.

    ``http_block`` is the documented http-level block; with ``tls``, the
    documented HTTPS server block is added (certificate from the tests' CA).
    """

    def __init__(
        self, prefix: Path, upstream_port: int, *, tls: bool = False, http_block: str | None = None
    ) -> None:
        self.prefix = prefix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tls_port = free_port() if tls else None
        self.tls_url = f"https://127.0.0.1:{self.tls_port}"
        http = replaced(
            documented("nginx: http") if http_block is None else http_block,
            {
                "server 127.0.0.1:8888;": f"server 127.0.0.1:{upstream_port};",
                "listen 80;": f"listen 127.0.0.1:{self.port};",
            },
        )
        blocks = [http]
        if tls:
            certificate = tls_certificate().write_demo_files(prefix)
            self.ca = tls_certificate().write_ca(prefix)
            blocks.append(
                replaced(
                    documented("nginx: https"),
                    {
                        "listen 443 ssl http2;": f"listen 127.0.0.1:{self.tls_port} ssl http2;",
                        "/etc/ssl/example.crt;": f"{certificate.cert};",
                        "/etc/ssl/example.key;": f"{certificate.key};",
                    },
                )
            )
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(self._main_conf(blocks))
        self.log = prefix / "nginx.log"
        self.proc: asyncio.subprocess.Process | None = None

    def _main_conf(self, blocks: list[str]) -> str:
        # As root, nginx's workers would run as `nobody`, which cannot enter the
        # test's private temporary directory.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {self.prefix / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        body = "\n".join(blocks)
        return (
            f"{user}\nworker_processes 1;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    access_log off;\n{temp}\n{body}\n}}\n"
        )

    async def start(self, timeout: float = 10.0) -> Nginx:
        if not os.access(NGINX, os.X_OK):
            pytest.fail(
                f"{NGINX} not found: the proxy tests run Debian's nginx; install it with "
                "`apt-get install nginx-light` (.ci/run does)",
                pytrace=False,
            )
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                str(NGINX),
                "-p",
                str(self.prefix),
                "-c",
                str(self.conf),
                "-g",
                f"daemon off; pid {self.prefix / 'nginx.pid'}; error_log stderr;",
                stdout=log,
                stderr=log,
            )
        ports = [self.port] if self.tls_port is None else [self.port, self.tls_port]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for port in ports:
            while not await accepts(port):
                assert self.proc.returncode is None, f"nginx exited:\n{self.log.read_text()}"
                assert loop.time() < deadline, f"nginx is not listening:\n{self.log.read_text()}"
                await asyncio.sleep(0.05)
        return self

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 10)

    async def fetch(self, path: str, **kwargs: Any) -> HTTPResponse:
        return await AsyncHTTPClient().fetch(
            self.url + path, raise_error=False, request_timeout=5, **kwargs
        )


async def accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@asynccontextmanager
async def running(nginx: Nginx) -> AsyncIterator[Nginx]:
    try:
        yield await nginx.start()
    finally:
        await nginx.stop()


async def publish(nginx: Nginx, data: str) -> str:
    """POST /publish through nginx (its ``location /``); the event's id."""
    response = await nginx.fetch("/publish", method="POST", body=data.encode())
    assert response.code == 200, response.body
    match = re.search(rb'"id": "([^"]+)"', response.body)
    assert match, response.body
    return match.group(1).decode()


# --- the page ---------------------------------------------------------------------------------

# An EventSource of the test's own on the page nginx served, logging what it sees
# with its readyState: independent of what the demo page itself does.
PROBE = """() => {
    window.probeLog = [];
    const source = new EventSource("/events");
    window.probe = source;
    for (const type of ["open", "error", "message", "welcome", "reset"]) {
        source.addEventListener(type, (e) => window.probeLog.push({
            type, data: e.data ?? null, id: e.lastEventId ?? null, readyState: source.readyState,
        }));
    }
}"""


async def open_probe(page: Page, nginx: Nginx) -> None:
    response = await page.goto(nginx.url + "/")
    assert response is not None and response.status == 200  # the demo page, via location /
    await page.evaluate(PROBE)
    await wait_for_probe(page, "welcome", 1)


async def wait_for_probe(page: Page, type_: str, count: int, timeout: float = 5.0) -> None:
    await page.wait_for_function(
        "([t, n]) => window.probeLog.filter(e => e.type === t).length >= n",
        arg=[type_, count],
        timeout=timeout * 1000,
    )


async def probe_log(page: Page) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = await page.evaluate("window.probeLog")
    return log


async def kill(demo: DemoProcess) -> None:
    assert demo.proc is not None
    demo.proc.send_signal(signal.SIGKILL)
    await demo.proc.wait()


# --- the tests --------------------------------------------------------------------------------


def test_docs_nginx_blocks_are_the_tested_ones() -> None:
    # Every nginx block of the docs is one this file runs: none that nothing checks.
    markers = [(b.path.name, b.marker) for b in blocks_in("nginx")]
    assert markers == [("proxies.md", "nginx: http"), ("proxies.md", "nginx: https")]


async def test_events_pass_through_unbuffered(tmp_path: Path) -> None:
    demo = DemoProcess()
    async with stopped_after(demo):
        await demo.start()
        async with running(Nginx(tmp_path, demo.port)) as nginx:
            page = await nginx.fetch("/")
            assert page.code == 200 and b"EventSource" in page.body
            client = await EventStreamClient.connect(nginx.url + "/events")
            async with client:
                assert client.status == 200
                assert client.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                assert (await client.next_event(timeout=2)).event == "welcome"
                for text in ("one", "two"):
                    event_id = await publish(nginx, text)
                    # One small event, not a buffer's worth: a buffering proxy holds it.
                    event = await client.next_event(timeout=2)
                    assert (event.id, event.data) == (event_id, text)


@pytest.mark.timeout(60)
async def test_page_keeps_reconnecting_through_an_outage(tmp_path: Path) -> None:
    # Tornado is killed, stays away for OUTAGE seconds, and comes back on the same
    # port: the page's EventSource, answered by @sse_down meanwhile, is back on
    # the stream by itself and receives the next event, without a reload.
    served = DemoProcess()
    restarted = copy.copy(served)
    async with (
        stopped_after(served, restarted),
        chromium(tmp_path / "profile") as browser,
    ):
        await served.start()
        async with running(Nginx(tmp_path, served.port)) as nginx:
            page = await browser.new_page()
            await open_probe(page, nginx)
            before = await publish(nginx, "before")
            await wait_for_probe(page, "message", 1)

            await kill(served)
            fallback = await nginx.fetch("/events")
            assert fallback.code == 200
            assert fallback.headers["Content-Type"] == "text/event-stream"
            assert fallback.body == b"retry: 2000\n\n"
            seen = len(await probe_log(page))
            await asyncio.sleep(OUTAGE)  # the outage itself: nothing to wait for

            during = (await probe_log(page))[seen:]
            # Answered by the fallback (open), told to retry, and retrying (error).
            assert [e["type"] for e in during].count("open") >= 2, during
            assert all(e["readyState"] != 2 for e in await probe_log(page))
            assert await page.evaluate("window.probe.readyState") != 2  # not CLOSED

            await restarted.start()
            await wait_for_probe(page, "welcome", 2, timeout=10)
            after = await publish(nginx, "after")
            await wait_for_probe(page, "message", 2)
            log = await probe_log(page)
            assert [(e["id"], e["data"]) for e in log if e["type"] == "message"] == [
                (before, "before"),
                (after, "after"),
            ]
            # The fallback left the last event id alone: the browser resumed from
            # `before`, which the restarted process's MemoryBroker cannot know.
            back = [e for e in log if e["type"] in ("welcome", "reset")][1:]
            assert [(e["type"], e["id"]) for e in back] == [("reset", before), ("welcome", before)]
            assert json.loads(back[0]["data"])["reason"] == "unknown_id"
            assert await page.evaluate("window.probe.readyState") == 1  # OPEN


@pytest.mark.timeout(30)
async def test_without_the_fallback_a_502_closes_the_page_for_good(tmp_path: Path) -> None:
    # What the error_page line is for: the same config without it.
    demo = DemoProcess()
    bare = without_line(documented("nginx: http"), "error_page 502 503 504")
    async with stopped_after(demo), chromium(tmp_path / "profile") as browser:
        await demo.start()
        async with running(Nginx(tmp_path, demo.port, http_block=bare)) as nginx:
            page = await browser.new_page()
            await open_probe(page, nginx)
            await kill(demo)
            assert (await nginx.fetch("/events")).code == 502
            await page.wait_for_function("() => window.probe.readyState === 2", timeout=10_000)


async def test_https_block_serves_the_stream_over_http2(tmp_path: Path) -> None:
    if not os.access(CURL, os.X_OK):
        pytest.fail(f"{CURL} not found: install Debian's curl", pytrace=False)
    demo = DemoProcess()
    async with stopped_after(demo):
        await demo.start()
        async with running(Nginx(tmp_path, demo.port, tls=True)) as nginx:
            curl = await asyncio.create_subprocess_exec(
                str(CURL),
                "--http2",
                "--cacert",
                str(nginx.ca),
                "--silent",
                "--show-error",
                "--no-buffer",
                "--dump-header",
                "-",
                nginx.tls_url + "/events",
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert curl.stdout is not None
                seen = await read_until(curl.stdout, b"event: welcome\n", timeout=5)
                head = seen.split(b"\r\n\r\n")[0].lower()
                assert head.startswith(b"http/2 200 ")
                assert b"\r\ncontent-type: text/event-stream; charset=utf-8" in head
                # The rest of the application over HTTPS (its location /), then the event.
                response = await AsyncHTTPClient().fetch(
                    nginx.tls_url + "/publish",
                    method="POST",
                    body=b"over h2",
                    ssl_options=tls_certificate().client_context(),
                    request_timeout=5,
                )
                assert response.code == 200
                await read_until(curl.stdout, b"data: over h2\n\n", timeout=2)
            finally:
                curl.terminate()
                await curl.wait()


async def read_until(stream: asyncio.StreamReader, needle: bytes, timeout: float) -> bytes:
    seen = b""

    async def read() -> None:
        nonlocal seen
        while needle not in seen:
            chunk = await stream.read(4096)
            assert chunk, f"curl ended before {needle!r}: {seen!r}"
            seen += chunk

    await asyncio.wait_for(read(), timeout)
    return seen
