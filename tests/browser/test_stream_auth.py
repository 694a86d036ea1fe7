"""The cookie + ticket recipe in Chromium (examples/stream_auth.py): a token that
expires mid-stream is renewed by the page, which resumes with no event lost."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import jwt
import pytest
from support import free_port
from test_browser import chromium
from tornado.httpclient import AsyncHTTPClient

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stream_auth.py"
SECRET = "browser-test-secret-of-32-bytes-or-more"


def publisher_token() -> str:
    claims = {"sub": "test", "exp": int(time.time()) + 300, "channels": [], "publish": ["room:*"]}
    encoded: str = jwt.encode(claims, SECRET, algorithm="HS256")
    return encoded


@pytest.mark.timeout(60)
async def test_the_page_renews_its_token_and_loses_no_event(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--port", str(port), "--secret", SECRET,
        "--token-ttl", "3", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert b"listening" in await asyncio.wait_for(proc.stdout.readline(), 15)
        async with chromium(tmp_path / "profile") as browser:
            page = await browser.new_page()
            stream_requests: list[str] = []
            page.on(
                "request", lambda r: stream_requests.append(r.url) if "/events" in r.url else None
            )
            await page.goto(url + "/")
            await page.wait_for_function("window.opened >= 1", timeout=10_000)
            sent = []
            headers = {"Authorization": f"Bearer {publisher_token()}"}
            # 45 events over about 4.5 s: the 3 s token expires while they flow.
            for n in range(1, 46):
                response = await AsyncHTTPClient().fetch(
                    f"{url}/publish?channel=room:1", method="POST", body=str(n), headers=headers
                )
                assert response.code == 200
                sent.append(str(n))
                await asyncio.sleep(0.1)  # the pace of the publisher, not a wait for the page
            await page.wait_for_function(
                "n => window.received.length >= n", arg=len(sent), timeout=15_000
            )
            assert await page.evaluate("window.received") == sent
            assert await page.evaluate("window.renewals") >= 1
            # Every stream was opened with a ticket (never a token in the URL), and a
            # reopened one resumed from its last event id.
            assert len(stream_requests) >= 2
            assert all("ticket=" in u and "token=" not in u for u in stream_requests)
            assert all("last_event_id=" in u for u in stream_requests[1:])
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
