"""The demo and the admin API, over real sockets: an in-process server, and the CLI."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from redis_server import RedisServer
from support import DemoProcess, DemoTLS, free_port, wait_until
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders
from tornado.testing import bind_unused_port

import sse_handler
from sse_handler import ServerSentEvent
from sse_handler.__main__ import main
from sse_handler.admin import admin_routes
from sse_handler.brokers import Delivery
from sse_handler.brokers.memory import MemoryBroker
from sse_handler.brokers.redis import RedisBroker
from sse_handler.demo.app import DemoHandler, make_app
from sse_handler.demo.page_stream import SharedBroker, envelope
from sse_handler.parser import EventStreamParser, MessageEvent

TOKEN = "s3cret-t\u00f6ken"  # non-ASCII: sent as UTF-8, compared as bytes
AUTH = {"Authorization": "Bearer " + TOKEN}


# --- helpers -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def demo_server(
    admin_token: str | None = None, broker: MemoryBroker | None = None
) -> AsyncIterator[tuple[int, DemoHandler]]:
    app, handler = make_app(admin_token, broker)
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
    async def open(
        cls, port: int, path: str = "/events", headers: dict[str, str] | None = None
    ) -> StreamClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n".encode()
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
async def stream(
    port: int, path: str = "/events", headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[StreamClient, str]]:
    """A connected client and its cid, read from the welcome event."""
    client = await StreamClient.open(port, path, headers)
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
    assert '"/page/events?"' in page
    assert "new EventSource(url)" in page
    assert '"/publish?' in page
    assert 'addEventListener("close"' in page
    assert "source.close()" in page
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


# --- the page's stream ---------------------------------------------------------------------


def enveloped(channel: str, event: str, event_id: str, data: str) -> MessageEvent:
    """What /page/events sends for one channel event."""
    body = {"channel": channel, "event": event, "id": event_id, "data": data}
    return MessageEvent(
        data=json.dumps(body, ensure_ascii=False, separators=(",", ":")), id=event_id
    )


async def test_page_stream_envelopes_any_event_while_events_keeps_the_wire() -> None:
    data = "two\nlines, caf\u00e9"
    async with (
        demo_server() as (port, _),
        stream(port) as (plain, _),
        stream(port, "/page/events") as (page, _),
    ):
        status, body = await publish(port, data.encode(), "?event=greeting")
        assert (status, body["delivered_to"]) == (200, 2)
        event_id = body["id"]
        assert await plain.next_event() == MessageEvent(data=data, event="greeting", id=event_id)
        got = await page.next_event()
        assert got == enveloped("default", "greeting", event_id, data)
        assert json.loads(got.data)["data"] == data

        status, body = await publish(port, b"no name")
        assert await plain.next_event() == MessageEvent(data="no name", id=body["id"])
        assert await page.next_event() == enveloped("default", "message", body["id"], "no name")


async def test_page_stream_reads_the_channels_it_names() -> None:
    async with (
        demo_server() as (port, _),
        stream(port, "/page/events?channel=a&channel=b") as (page, _),
    ):
        _, first = await publish(port, b"to a", "?channel=a")
        _, unread = await publish(port, b"to c", "?channel=c&event=other")
        _, second = await publish(port, b"to b", "?channel=b&event=news&id=b-1")
        assert (first["delivered_to"], unread["delivered_to"]) == (1, 0)
        assert second == {"delivered_to": 1, "id": "b-1"}
        assert await page.next_event() == enveloped("a", "message", first["id"], "to a")
        assert await page.next_event() == enveloped("b", "news", "b-1", "to b")


async def test_page_stream_resumes_with_last_event_id() -> None:
    async with demo_server() as (port, _):
        async with stream(port, "/page/events?channel=a") as (page, _):
            _, seen = await publish(port, b"seen", "?channel=a&event=x")
            assert await page.next_event() == enveloped("a", "x", seen["id"], "seen")
        missed = [(await publish(port, f"missed {i}".encode(), "?channel=a"))[1] for i in (1, 2)]
        client = await StreamClient.open(
            port, "/page/events?channel=a", {"Last-Event-ID": seen["id"]}
        )
        try:
            got = [await client.next_event() for _ in range(len(missed) + 1)]
        finally:
            await client.close()
    assert [e for e in got if e.event != "welcome"] == [
        enveloped("a", "message", m["id"], f"missed {i}")
        for i, m in zip((1, 2), missed, strict=True)
    ]
    assert [e.event for e in got].count("welcome") == 1


async def test_one_replay_answer_for_both_streams_is_rewritten_for_neither(
    redis_server: RedisServer,
) -> None:
    # A RedisBroker answers clients that ask at once for the same channels and
    # cursor with one Replay: the page stream's envelopes must not reach a
    # client of /events that joined it (nor the reverse).
    broker = RedisBroker(redis_server.url)
    shared = SharedBroker(broker)
    plain, page = shared.view(), shared.view(envelope)
    try:
        ids = [await broker.publish("a", ServerSentEvent(data=f"e{n}")) for n in range(3)]
        for first, second in ((plain, page), (page, plain)):
            answers = await asyncio.gather(
                first.replay(["a"], ids[0]), second.replay(["a"], ids[0])
            )
            by_view = dict(zip((first, second), answers, strict=True))
            assert [d.frame for d in by_view[plain].deliveries] == [
                f"id: {ids[n]}\ndata: e{n}\n\n".encode() for n in (1, 2)
            ]
            assert [d.frame for d in by_view[page].deliveries] == [
                envelope(d).frame for d in by_view[plain].deliveries
            ]
    finally:
        await broker.close()


@pytest.mark.parametrize("leaves", ["/events", "/page/events"])
async def test_a_channel_stays_subscribed_while_either_stream_reads_it(leaves: str) -> None:
    # Each stream's router unsubscribes the process when its own last reader
    # leaves; the shared broker keeps the channel for the other stream.
    broker = MemoryBroker()
    seen: list[Delivery] = []
    broker.add_listener(seen.append)
    stays = "/page/events" if leaves == "/events" else "/events"
    async with demo_server(broker=broker) as (port, handler):
        async with stream(port, stays) as (client, _):
            async with stream(port, leaves):
                pass
            await wait_until(lambda: handler.shared_broker.views_reading("default") == 1)
            _, body = await publish(port, b"still read")
            assert body["delivered_to"] == 1
            got = await client.next_event()
            assert got.id == body["id"]
            assert "still read" in got.data
        await wait_until(lambda: handler.shared_broker.views_reading("default") == 0)
        # Nobody reads it now: the broker itself was unsubscribed.
        before = len(seen)
        await publish(port, b"unread")
        assert len(seen) == before


async def test_page_stream_keeps_the_names_of_the_connections_own_events() -> None:
    async with demo_server() as (port, handler):
        reset = await StreamClient.open(port, "/page/events", {"Last-Event-ID": "nosuchid"})
        try:
            got = {(await reset.next_event()).event for _ in range(2)}
        finally:
            await reset.close()
        assert got == {"welcome", "reset"}
        async with stream(port, "/page/events") as (client, _):
            await handler.shutdown(grace=1)
            assert [e.event for e in await client.rest_until_eof()] == ["shutdown"]


def test_envelope_keeps_retry_and_leaves_a_frame_without_data() -> None:
    frame = b"id: 7\nevent: tick\nretry: 500\ndata: a\ndata: b\n\n"
    [got] = EventStreamParser().feed(envelope(Delivery("c", "7", 7, frame)).frame)
    assert got == MessageEvent(
        data='{"channel":"c","event":"tick","id":"7","data":"a\\nb"}', id="7", retry=500
    )
    bare = Delivery("c", "8", 8, b"id: 8\n: a comment\n\n")
    assert envelope(bare) is bare


async def test_admin_lists_and_stops_page_stream_connections() -> None:
    async with (
        demo_server(TOKEN) as (port, handler),
        stream(port) as (_, plain_cid),
        stream(port, "/page/events?channel=a") as (page, page_cid),
    ):
        listing = json.loads((await fetch(port, "/admin/connections", headers=AUTH)).body)
        assert {(c["cid"], c["path"]) for c in listing} == {
            (plain_cid, "/events"),
            (page_cid, "/page/events"),
        }
        one = await fetch(port, f"/admin/connections/{page_cid}", headers=AUTH)
        assert json.loads(one.body)["channels"] == ["a"]
        stop = await fetch(port, f"/admin/connections/{page_cid}", method="DELETE", headers=AUTH)
        assert stop.code == 204
        # The connection's own events keep their names on the page's stream.
        assert await page.next_event() == MessageEvent(data="", event="close")
        assert await page.rest_until_eof() == []
        assert handler.connection_ids() == [plain_cid]


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
    assert "nosuchcid" in _json_error(response)


async def test_admin_get_one_connection_gives_its_stats() -> None:
    async with demo_server(TOKEN) as (port, _), stream(port) as (_, cid):
        response = await fetch(port, f"/admin/connections/{cid}", headers=AUTH)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    stats = json.loads(response.body)
    assert (stats["cid"], stats["path"], stats["channels"]) == (cid, "/events", ["default"])
    assert stats["state"] == "live"
    assert stats["events_sent"] == 1  # the welcome


def _json_error(response: HTTPResponse) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), response.body
    body = json.loads(response.body)
    assert list(body) == ["error"]
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/admin/connections", "GET"),
        ("PUT", "/admin/connections/{cid}", "GET, DELETE"),
        ("POST", "/admin/connections/{cid}", "GET, DELETE"),
    ],
)
async def test_admin_method_not_allowed_is_json_with_allow(
    method: str, path: str, allow: str
) -> None:
    async with demo_server(TOKEN) as (port, handler), stream(port) as (_, cid):
        response = await fetch(port, path.format(cid=cid), method=method, body=b"", headers=AUTH)
        assert handler.connection_ids() == [cid]
    assert response.code == 405
    assert response.headers["Allow"] == allow
    assert _json_error(response) == "method not allowed"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/connections/nosuchcid"),
        ("DELETE", "/admin/connections/nosuchcid"),
        ("GET", "/admin"),
        ("GET", "/admin/"),
        ("GET", "/admin/nothing/here"),
        ("DELETE", "/admin/connections/a/b"),
    ],
)
async def test_admin_not_found_is_json(method: str, path: str) -> None:
    async with demo_server(TOKEN) as (port, _):
        response = await fetch(port, path, method=method, headers=AUTH)
        refused = await fetch(port, path, method=method)
    assert response.code == 404
    named = "nosuchcid" if "nosuchcid" in path else path
    assert named in _json_error(response)
    # Without the token, the path is not even looked up.
    assert refused.code == 401
    assert _json_error(refused) == "missing bearer token"


async def test_admin_bad_request_is_json() -> None:
    # A body Tornado cannot parse (multipart without a boundary): its 400 is JSON too.
    async with demo_server(TOKEN) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"DELETE /admin/connections/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: multipart/form-data\r\n"
            "Content-Length: 3\r\nConnection: close\r\n\r\na=1".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"\r\nContent-Type: application/json" in head
    assert json.loads(body)["error"].startswith("Invalid body")


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


def _cli_env() -> dict[str, str]:
    """The environment for ``python -m sse_handler``: this checkout first on the path."""
    root = str(Path(sse_handler.__file__).resolve().parent.parent)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }


async def test_cli_demo_serves_and_exits_cleanly_on_sigterm() -> None:
    sock, port = bind_unused_port()
    sock.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sse_handler", "demo", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_cli_env(),
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


# --- the command line over HTTPS -----------------------------------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> DemoTLS:
    """A certificate for 127.0.0.1 in PEM files, and a client context trusting its CA."""
    leaf = tls_ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    client = ssl.create_default_context()
    tls_ca.configure_trust(client)
    return DemoTLS(cert, key, client)


async def _run_cli_demo(*args: str) -> tuple[int, str]:
    """``python -m sse_handler demo ARGS`` on a free port: its exit status and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sse_handler", "demo", "--port", str(free_port()), *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=_cli_env(),
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:  # it started serving: the test fails on the timeout
            proc.kill()
            await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stderr.decode()


async def test_cli_demo_over_https_serves_the_page_publish_and_admin(tls: DemoTLS) -> None:
    demo = DemoProcess("--admin-token", TOKEN, tls=tls, keep_stderr=True)
    try:
        await demo.start()
        page = await demo.fetch("/")
        status, published = await demo.publish("over TLS")
        listing = await demo.fetch("/admin/connections", headers=AUTH)
        refused = await demo.fetch("/admin/connections", headers={"Authorization": "Bearer x"})
        unknown = await demo.fetch("/admin/connections/nosuchcid", method="DELETE", headers=AUTH)
    finally:
        returncode = await demo.stop()
    assert page.code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert b'"/page/events?"' in page.body
    assert (status, published["delivered_to"]) == (200, 0)
    assert published["id"].isascii()
    assert listing.code == 200
    assert listing.headers["Content-Type"].startswith("application/json")
    assert json.loads(listing.body) == []
    assert refused.code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert unknown.code == 404
    assert returncode == 0, demo.stderr
    assert f"open https://127.0.0.1:{demo.port}/ in a browser" in demo.stderr


async def test_cli_demo_over_https_gives_plain_http_no_page(tls: DemoTLS) -> None:
    demo = DemoProcess(tls=tls)
    try:
        await demo.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", demo.port)
        writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{demo.port}\r\n\r\n".encode())
        try:
            answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        except ConnectionError:
            answer = b""
        writer.close()
        # The refused handshake costs the server nothing: HTTPS still works.
        after = await demo.fetch("/")
    finally:
        await demo.stop()
    assert not answer.startswith(b"HTTP/"), answer
    assert b"<html" not in answer.lower()
    assert after.code == 200


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """A response body as it arrives, without the chunked framing if there is one."""
    if not chunked:
        while chunk := await reader.read(65536):
            yield chunk
        return
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            return
        chunk = await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
        yield chunk


async def test_cli_demo_streams_events_over_https(tls: DemoTLS) -> None:
    demo = DemoProcess(tls=tls)
    try:
        await demo.start()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", demo.port, ssl=tls.client, server_hostname="127.0.0.1"
            ),
            5,
        )
        try:
            writer.write(
                f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{demo.port}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 "), head
            headers = HTTPHeaders.parse(head.decode("latin-1").partition("\r\n")[2])
            assert headers["Content-Type"].startswith("text/event-stream")
            chunked = headers.get("Transfer-Encoding", "").lower() == "chunked"
            body = _body(reader, chunked)
            parser = EventStreamParser(keep_comments=True)
            events: collections.deque[MessageEvent] = collections.deque()

            async def next_event() -> MessageEvent:
                while not events:
                    events.extend(parser.feed(await asyncio.wait_for(anext(body), 5)))
                return events.popleft()

            welcome = await next_event()
            assert parser.comments[:1] == ["ok"]
            assert welcome.event == "welcome"
            status, published = await demo.publish("over TLS")
            assert (status, published["delivered_to"]) == (200, 1)
            assert await next_event() == MessageEvent(data="over TLS", id=published["id"])
        finally:
            # No orderly TLS close: it would raise again what a failed read raised.
            writer.transport.abort()
    finally:
        await demo.stop()


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
async def test_cli_one_tls_flag_alone_is_a_usage_error(tls: DemoTLS, flag: str) -> None:
    returncode, stderr = await _run_cli_demo(
        flag, str(tls.cert if flag == "--tls-cert" else tls.key)
    )
    assert returncode == 2
    assert stderr.startswith("usage: ")
    assert "error: --tls-cert and --tls-key go together" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        pytest.param(
            "missing",
            "key",
            "cannot read --tls-cert {cert}: No such file or directory",
            id="missing-cert",
        ),
        pytest.param(
            "cert",
            "missing",
            "cannot read --tls-key {key}: No such file or directory",
            id="missing-key",
        ),
        pytest.param(
            "folder", "key", "cannot read --tls-cert {cert}: Is a directory", id="cert-is-a-folder"
        ),
        pytest.param("key", "key", "--tls-cert {cert} holds no PEM certificate", id="key-as-cert"),
        pytest.param("cert", "cert", "--tls-key {key} holds no PEM private key", id="cert-as-key"),
        pytest.param(
            "cert",
            "other key",
            "--tls-key {key} is not the private key of --tls-cert {cert}",
            id="key-of-another-cert",
        ),
        pytest.param(
            "cert",
            "encrypted key",
            "--tls-key {key} is encrypted; give the key unencrypted",
            id="encrypted-key",
        ),
    ],
)
async def test_cli_tls_files_that_do_not_load_are_one_line_on_stderr(
    tls: DemoTLS, tls_ca: trustme.CA, tmp_path: Path, cert: str, key: str, message: str
) -> None:
    other = tls_ca.issue_cert("127.0.0.1")
    (tmp_path / "other.key").write_bytes(other.private_key_pem.bytes())
    private_key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    (tmp_path / "encrypted.key").write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    files = {
        "cert": tls.cert,
        "key": tls.key,
        "missing": tmp_path / "missing.pem",
        "folder": tmp_path,
        "other key": tmp_path / "other.key",
        "encrypted key": tmp_path / "encrypted.key",
    }
    returncode, stderr = await _run_cli_demo(
        "--tls-cert", str(files[cert]), "--tls-key", str(files[key])
    )
    assert returncode == 1
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    expected = message.format(cert=files[cert], key=files[key])
    assert line == f"python -m sse_handler demo: error: {expected}"
