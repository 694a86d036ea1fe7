"""Examples are real programs: start each one and talk to it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode

from redis_server import RedisServer
from support import free_port
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from sse_handler.testing import EventStreamClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@asynccontextmanager
async def example(
    name: str, *args: str, ready: bytes = b"listening", processes: int = 1
) -> AsyncIterator[str]:
    """Run ``examples/<name>`` on a free port until the block ends; yields its base URL.

    Ready once ``processes`` lines containing ``ready`` were printed.
    """
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        "--port",
        str(port),
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        stdout = proc.stdout

        async def wait_ready() -> None:
            seen = b""
            while seen.count(ready) < processes:
                chunk = await stdout.read(4096)
                assert chunk, f"exited before it was ready: {seen!r}"
                seen += chunk

        await asyncio.wait_for(wait_ready(), 15)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)


async def fetch(url: str, **kwargs: object) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(url, raise_error=False, **kwargs)  # type: ignore[arg-type]


async def test_welcome_example() -> None:
    async with example("welcome.py", "--interval", "0.05") as url:
        client = await EventStreamClient.connect(url + "/events")
        welcome = await client.next_event()
        assert welcome.event == "welcome"
        assert welcome.data.startswith('{"connection_id":"')
        tick = await client.next_event()
        assert tick.event == "tick"
        client.close()


async def test_ticker_example_pulls_from_its_own_source() -> None:
    async with example("ticker.py", "--interval", "0.02") as url:
        client = await EventStreamClient.connect(url + "/prices?symbol=INITECH")
        hello = await client.next_event()
        assert (hello.event, json.loads(hello.data)) == ("hello", {"symbol": "INITECH"})
        ticks = await client.events(10)
        assert {t.event for t in ticks} == {"tick"}
        assert {json.loads(t.data)["symbol"] for t in ticks} == {"INITECH"}
        ids = [int(t.id) for t in ticks]
        assert ids == sorted(ids) and len(set(ids)) == 10
        client.close()


async def test_chat_example_rooms_and_resume() -> None:
    async with example("chat.py") as url:
        page = await fetch(url + "/")
        assert page.code == 200 and b"EventSource" in page.body
        lobby = await EventStreamClient.connect(url + "/rooms/lobby/events")
        # A stream that is open is subscribed: the head comes after that.
        other = await EventStreamClient.connect(url + "/rooms/other/events")

        async def say(room: str, text: str) -> str:
            body = urlencode({"name": "ann", "text": text})
            response = await fetch(f"{url}/rooms/{room}/messages", method="POST", body=body)
            assert response.code == 200
            return str(json.loads(response.body)["id"])

        first = await say("lobby", "hello")
        event = await lobby.next_event()
        assert (event.event, json.loads(event.data), event.id) == (
            "chat",
            {"name": "ann", "text": "hello"},
            first,
        )
        lobby.abort()
        await say("lobby", "while you were away")
        await say("other", "elsewhere")
        back = await EventStreamClient.connect(
            url + "/rooms/lobby/events", {"Last-Event-ID": first}
        )
        missed = await back.next_event()
        assert json.loads(missed.data)["text"] == "while you were away"
        assert json.loads((await other.next_event()).data)["text"] == "elsewhere"
        assert b"elsewhere" not in back.raw
        empty = await fetch(f"{url}/rooms/lobby/messages", method="POST", body="text=")
        assert empty.code == 400
        back.close()
        other.close()


async def test_admin_example_lists_and_stops() -> None:
    async with example("admin.py", "--token", "s3cret", "--max-age", "1.5") as url:
        client = await EventStreamClient.connect(url + "/events")
        auth = {"Authorization": "Bearer s3cret"}
        assert (await fetch(url + "/admin/connections")).code == 401
        listing = json.loads((await fetch(url + "/admin/connections", headers=auth)).body)
        assert len(listing) == 1
        # The API stops one connection...
        victim = await EventStreamClient.connect(url + "/events")
        listing = json.loads((await fetch(url + "/admin/connections", headers=auth)).body)
        cid = max(listing, key=lambda c: c["connected_at"])["cid"]
        stopped = await fetch(f"{url}/admin/connections/{cid}", method="DELETE", headers=auth)
        assert stopped.code == 204
        assert [e.event for e in await victim.wait_closed()] == ["close"]
        # ...and the janitor (admin code) stops the old one at its max age.
        events = await client.wait_closed(timeout=5)
        assert [(e.event, e.data) for e in events] == [("reconnect", "max age reached")]
        assert client.parser.retry is not None and 500 <= client.parser.retry <= 2000


async def test_multiprocess_example(redis_server: RedisServer) -> None:
    args = ("--redis", redis_server.url, "--processes", "2")
    async with example("multiprocess.py", *args, ready=b"serving", processes=2) as url:
        clients = [await EventStreamClient.connect(url + "/events?channel=news") for _ in range(6)]
        for client in clients:
            assert (await client.next_event()).event == "welcome"
        response = await fetch(url + "/publish?channel=news", method="POST", body="extra")
        assert response.code == 200
        published = json.loads(response.body)["id"]
        for client in clients:
            event = await client.next_event(timeout=10)
            assert (event.data, event.id) == ("extra", published)
            client.close()
