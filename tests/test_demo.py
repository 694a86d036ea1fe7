"""The demo and the admin API, over real sockets: an in-process server, and the CLI."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

import sse_handler
from sse_handler.__main__ import main
from sse_handler.admin import admin_routes
from sse_handler.demo.app import DemoHandler, make_app
from sse_handler.parser import EventStreamParser, MessageEvent

TOKEN = "s3cret-t\u00f6ken"  # non-ASCII: sent as UTF-8, compared as bytes
AUTH = {"Authorization": "Bearer " + TOKEN}


# --- helpers -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def demo_server(admin_token: str | None = None) -> AsyncIterator[tuple[int, DemoHandler]]:
    app, handler = make_app(admin_token)
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    try:
        yield port, handler
    finally:
        server.stop()
        await handler.shutdown(grace=0.5)
        await server.close_all_connections()


async def fetch(
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> HTTPResponse:
    client = AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(
            f"http://127.0.0.1:{port}{path}",
            method=method,
            body=body,
            headers={k: v.encode("utf-8").decode("latin-1") for k, v in (headers or {}).items()},
            raise_error=False,
            request_timeout=5,
        )
    finally:
        client.close()


async def publish(port: int, data: bytes, query: str = "") -> tuple[int, Any]:
    response = await fetch(port, "/publish" + query, method="POST", body=data)
    return response.code, json.loads(response.body)


class StreamClient:
    """A raw-socket reader of ``/events`` that sees both the events and the EOF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = EventStreamParser()
        self.events: collections.deque[MessageEvent] = collections.deque()

    @classmethod
    async def open(cls, port: int) -> StreamClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"text/event-stream" in head
        return cls(reader, writer)

    async def _read(self) -> bytes:
        chunk = await asyncio.wait_for(self.reader.read(65536), 5)
        self.events.extend(self.parser.feed(chunk))
        return chunk

    async def next_event(self) -> MessageEvent:
        while not self.events:
            if not await self._read():
                raise EOFError("the stream ended")
        return self.events.popleft()

    async def rest_until_eof(self) -> list[MessageEvent]:
        while await self._read():
            pass
        rest = list(self.events)
        self.events.clear()
        return rest

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def stream(port: int) -> AsyncIterator[tuple[StreamClient, str]]:
    """A connected client and its cid, read from the welcome event."""
    client = await StreamClient.open(port)
    try:
        welcome = await client.next_event()
        assert welcome.event == "welcome"
        yield client, json.loads(welcome.data)["connection_id"]
    finally:
        await client.close()


# --- the page and the stream --------------------------------------------------------------


async def test_page_is_served_self_contained() -> None:
    async with demo_server() as (port, _):
        response = await fetch(port, "/")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    page = response.body.decode("utf-8")
    assert 'new EventSource("/events")' in page
    assert '"/publish?' in page
    assert 'addEventListener("close"' in page
    assert "es.close()" in page
    assert "http:" not in page
    assert "https:" not in page


async def test_first_event_is_welcome_with_the_cid() -> None:
    async with demo_server() as (port, handler):
        client = await StreamClient.open(port)
        try:
            welcome = await client.next_event()
            [cid] = handler.connection_ids()
        finally:
            await client.close()
    assert welcome.event == "welcome"
    assert welcome.data == json.dumps({"connection_id": cid}, separators=(",", ":"))
    assert json.loads(welcome.data) == {"connection_id": cid}


async def test_welcome_cid_is_registered() -> None:
    async with demo_server() as (port, handler), stream(port) as (_, cid):
        assert handler.connection_ids() == [cid]


# --- publish -------------------------------------------------------------------------------


async def test_publish_reaches_the_stream_exactly() -> None:
    data = "two\nlines, caf\u00e9 \U0001f600"
    async with demo_server() as (port, _), stream(port) as (client, _):
        status, body = await publish(port, data.encode(), "?event=greeting&id=" + quote("42/a b"))
        assert (status, body) == (200, {"delivered_to": 1, "id": "42/a b"})
        assert await client.next_event() == MessageEvent(data=data, event="greeting", id="42/a b")


async def test_publish_without_fields_is_a_message() -> None:
    async with demo_server() as (port, _), stream(port) as (client, _):
        status, body = await publish(port, b"")
        assert (status, body["delivered_to"]) == (200, 1)
        assert body["id"].isascii()
        assert await client.next_event() == MessageEvent(data="", event="message", id=body["id"])


async def test_publish_to_nobody_delivers_to_zero() -> None:
    async with demo_server() as (port, _):
        status, body = await publish(port, b"x")
        assert (status, body["delivered_to"]) == (200, 0)
        assert body["id"].isascii()


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?event=a%0Ab", "event"),
        ("?event=a%0Db", "event"),
        ("?id=a%00b", "id"),
        ("?id=a%0Ab", "id"),
    ],
)
async def test_publish_refuses_a_bad_field_and_sends_nothing(query: str, field: str) -> None:
    async with demo_server() as (port, _), stream(port) as (client, _):
        status, body = await publish(port, b"bad", query)
        assert status == 400
        assert body["error"].startswith(field + " ")
        assert await publish(port, b"good", "?id=1") == (200, {"delivered_to": 1, "id": "1"})
        assert await client.next_event() == MessageEvent(data="good", id="1")


async def test_publish_refuses_invalid_utf8() -> None:
    async with demo_server() as (port, _), stream(port) as (client, _):
        status, body = await publish(port, b"caf\xe9")
        assert status == 400
        assert "UTF-8" in body["error"]
        assert "data" in body["error"]
        status, body = await publish(port, b"x", "?event=%FF")
        assert status == 400
        assert body["error"].startswith("event ")
        status, body = await publish(port, b"good")
        assert (status, body["delivered_to"]) == (200, 1)
        assert body["id"].isascii()
        assert (await client.next_event()).data == "good"


# --- admin ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer " + TOKEN + "x"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic " + TOKEN},
    ],
)
async def test_admin_refuses_without_the_right_token(headers: dict[str, str]) -> None:
    async with demo_server(TOKEN) as (port, handler), stream(port) as (client, cid):
        listing = await fetch(port, "/admin/connections", headers=headers)
        stop = await fetch(port, f"/admin/connections/{cid}", method="DELETE", headers=headers)
        for response in (listing, stop):
            assert response.code == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "error" in json.loads(response.body)
        assert handler.connection_ids() == [cid]
        status, body = await publish(port, b"still here")
        assert (status, body["delivered_to"]) == (200, 1)
        assert body["id"].isascii()
        assert (await client.next_event()).data == "still here"


async def test_admin_lists_the_connections() -> None:
    async with demo_server(TOKEN) as (port, _), stream(port) as (_, cid):
        response = await fetch(port, "/admin/connections", headers=AUTH)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    [stats] = json.loads(response.body)
    assert stats["cid"] == cid
    assert stats["path"] == "/events"
    assert stats["remote_ip"] == "127.0.0.1"
    assert 0 < stats["connected_at"] <= time.time()
    assert stats["queue_depth"] == 0
    assert stats["events_sent"] == 1  # the welcome


async def test_admin_delete_sends_close_then_ends_the_stream() -> None:
    async with demo_server(TOKEN) as (port, handler), stream(port) as (client, cid):
        response = await fetch(port, f"/admin/connections/{cid}", method="DELETE", headers=AUTH)
        assert response.code == 204
        assert response.body == b""
        assert await client.next_event() == MessageEvent(data="", event="close")
        assert await client.rest_until_eof() == []
        assert cid not in handler.connection_ids()


async def test_admin_delete_unknown_cid_is_404() -> None:
    async with demo_server(TOKEN) as (port, _):
        response = await fetch(port, "/admin/connections/nosuchcid", method="DELETE", headers=AUTH)
    assert response.code == 404
    assert "nosuchcid" in json.loads(response.body)["error"]


async def test_admin_routes_are_absent_without_a_token() -> None:
    async with demo_server() as (port, _), stream(port) as (_, cid):
        listing = await fetch(port, "/admin/connections", headers=AUTH)
        stop = await fetch(port, f"/admin/connections/{cid}", method="DELETE", headers=AUTH)
        assert (listing.code, stop.code) == (404, 404)


def test_admin_routes_refuse_an_empty_token() -> None:
    with pytest.raises(ValueError, match="token"):
        admin_routes(DemoHandler(), "")


# --- the command line ----------------------------------------------------------------------


def test_cli_refuses_an_empty_admin_token(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--admin-token", ""])
    assert exc.value.code == 2
    assert "admin token" in capsys.readouterr().err


def test_cli_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "demo" in capsys.readouterr().err


async def test_cli_demo_serves_and_exits_cleanly_on_sigterm() -> None:
    sock, port = bind_unused_port()
    sock.close()
    root = str(Path(sse_handler.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sse_handler", "demo", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        await _wait_until_serving(proc, port)
        client = await StreamClient.open(port)
        try:
            welcome = await client.next_event()
            assert welcome.event == "welcome"
            proc.send_signal(signal.SIGTERM)
            # The open stream gets the handler's farewell before the process exits.
            assert [e.event for e in await client.rest_until_eof()] == ["shutdown"]
        finally:
            await client.close()
        _, stderr = await asyncio.wait_for(proc.communicate(), 5)
        assert proc.returncode == 0, stderr.decode()
        assert f"http://127.0.0.1:{port}/" in stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def _wait_until_serving(proc: asyncio.subprocess.Process, port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            response = await fetch(port, "/")
        except OSError:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        assert response.code == 200
        return
