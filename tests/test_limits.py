"""Limits, CORS and hostile requests: 4xx or a retry hint, never a 5xx, never a crash."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket

import pytest
from support import parse_head, read_to_eof, serve, trickle, wait_until
from tornado.httpclient import AsyncHTTPClient
from tornado.netutil import bind_sockets
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from sse_handler import CloseReason, ServerSentEvent, ServerSentEventHandler
from sse_handler.server import make_server
from sse_handler.testing import EventStreamClient


async def test_global_cap_answers_200_with_a_retry_hint() -> None:
    handler = ServerSentEventHandler(max_connections=2, reconnect_retry=(1000, 2000))
    async with serve([handler.route("/events")], handler) as server:
        a, b = await server.stream(), await server.stream()
        over = await server.stream()
        assert over.status == 200
        assert over.headers["Content-Type"].startswith("text/event-stream")
        # Turned away: the hint, then the server closes the connection.
        await over.wait_closed()
        assert over.parser.retry is not None and 1000 <= over.parser.retry <= 2000
        assert len(handler) == 2
        a.close()
        await wait_until(lambda: len(handler) == 1)
        again = await server.stream()
        await wait_until(lambda: len(handler) == 2)
        for client in (b, over, again):
            client.close()


async def test_per_address_cap_and_status_choice() -> None:
    handler = ServerSentEventHandler(max_connections_per_ip=1, over_limit_status=429)
    async with serve([handler.route("/events")], handler) as server:
        url = server.url + "/events"
        first = await EventStreamClient.connect(url, local_addr=("127.0.0.1", 0))
        refused = await EventStreamClient.connect(url, local_addr=("127.0.0.1", 0))
        assert refused.status == 429
        assert int(refused.headers["Retry-After"]) >= 1
        # Another client address is not held back by the first one's cap.
        other = await EventStreamClient.connect(url, local_addr=("127.0.0.2", 0))
        assert other.status == 200
        await wait_until(lambda: len(handler) == 2)
        for client in (first, refused, other):
            client.close()
    with pytest.raises(ValueError, match="over_limit_status"):
        ServerSentEventHandler(over_limit_status=500)


async def test_max_connection_age_stops_with_a_jittered_retry() -> None:
    handler = ServerSentEventHandler(max_connection_age=0.3, reconnect_retry=(100, 900))
    async with serve([handler.route("/events")], handler) as server:
        loop = asyncio.get_running_loop()
        start = loop.time()
        clients = [await server.stream() for _ in range(5)]
        conns = handler.connections()
        for client in clients:
            await client.wait_closed(timeout=2)
            assert 100 <= (client.parser.retry or 0) <= 900
        elapsed = loop.time() - start
        assert 0.27 <= elapsed <= 1.0
        assert {c.close_reason for c in conns} == {CloseReason.MAX_AGE}


async def test_max_event_size_refuses_and_sends_nothing() -> None:
    handler = ServerSentEventHandler(max_event_size=100)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        conn = handler.connections()[0]
        with pytest.raises(ValueError, match="max_event_size"):
            handler.send_all(data="x" * 200)
        with pytest.raises(ValueError, match="max_event_size"):
            conn.send(data="y" * 200)
        with pytest.raises(ValueError, match="max_event_size"):
            await handler.publish("default", data="z" * 200)
        handler.send_all(data="small")
        assert (await client.next_event()).data == "small"
        assert b"xxx" not in client.raw and b"yyy" not in client.raw
        client.close()


async def test_hostile_last_event_ids_get_a_reset_not_an_error() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        await handler.publish("default", data="history")
        hostile = [
            {"Last-Event-ID": "9" * 10_000},
            {"Last-Event-ID": "caf\xe9-\xff\xfe"},
        ]
        for headers in hostile:
            client = await server.stream(headers=headers)
            assert client.status == 200
            event = await client.next_event()
            assert (event.event, json.loads(event.data)) == ("reset", {"reason": "unknown_id"})
            client.close()
        # Control characters in a header: Tornado refuses the request itself.
        control = await server.stream(headers={"Last-Event-ID": "1\x01\x02-3"})
        assert control.status == 400
        control.close()
        with_nul = await server.stream("/events?last_event_id=1%00-2")
        assert with_nul.status == 200
        assert (await with_nul.next_event()).event == "reset"
        bad_utf8 = await server.stream("/events?last_event_id=%ff%fe")
        assert bad_utf8.status == 400
        with_nul.close()
        bad_utf8.close()


async def test_cors_allow_list() -> None:
    handler = ServerSentEventHandler(cors_origins=["https://app.example"], cors_credentials=True)
    async with serve([handler.route("/events")], handler) as server:
        ok = await server.stream(headers={"Origin": "https://app.example"})
        assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert ok.headers["Access-Control-Allow-Credentials"] == "true"
        assert ok.headers["Vary"] == "Origin"
        other = await server.stream(headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        http = AsyncHTTPClient()
        preflight = await http.fetch(
            server.url + "/events",
            method="OPTIONS",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Headers": "last-event-id",
            },
            raise_error=False,
        )
        assert preflight.code == 204
        assert "Last-Event-ID" in preflight.headers["Access-Control-Allow-Headers"]
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
        denied = await http.fetch(
            server.url + "/events",
            method="OPTIONS",
            headers={"Origin": "https://evil.example"},
            raise_error=False,
        )
        assert denied.code == 403
        ok.close()
        other.close()
    with pytest.raises(ValueError, match="credentials"):
        ServerSentEventHandler(cors_origins=["*"], cors_credentials=True)
    anyone = ServerSentEventHandler(cors_origins=["*"])
    async with serve([anyone.route("/events")], anyone) as server:
        client = await server.stream(headers={"Origin": "https://x.example"})
        assert client.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in client.headers
        client.close()
    plain = ServerSentEventHandler()
    async with serve([plain.route("/events")], plain) as server:
        response = await AsyncHTTPClient().fetch(
            server.url + "/events", method="OPTIONS", raise_error=False
        )
        assert response.code == 405


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_half_open_connections_are_dropped_by_the_header_timeout() -> None:
    handler = ServerSentEventHandler()
    # A backlog that holds the whole flood, so the test does not wait on SYN
    # retransmits (the default of 128 would).
    sockets = bind_sockets(0, "127.0.0.1", backlog=2048)
    port = sockets[0].getsockname()[1]
    server = make_server(Application([handler.route("/events")]), header_timeout=0.3)
    server.add_sockets(sockets)
    try:
        client = await EventStreamClient.connect(f"http://127.0.0.1:{port}/events")
        await wait_until(lambda: len(handler) == 1)
        baseline = open_fds()
        silent = []
        for _ in range(1000):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            silent.append(s)
        # The server holds them (the client ends are 1,000 of these fds).
        await wait_until(lambda: open_fds() >= baseline + 1500, timeout=5)
        # Each silent socket is closed by the server once the timeout passes.
        loop = asyncio.get_running_loop()

        def all_closed() -> bool:
            for s in silent:
                try:
                    if s.recv(1) != b"":
                        return False
                except BlockingIOError:
                    return False
                except OSError:
                    pass
            return True

        await wait_until(all_closed, timeout=10)
        for s in silent:
            s.close()
        await wait_until(lambda: open_fds() <= baseline + 5, timeout=5)
        # The stream went on meanwhile.
        handler.send_all(data="still streaming")
        assert (await client.next_event()).data == "still streaming"
        assert loop.time() > 0
        client.close()
    finally:
        server.stop()
        await handler.shutdown(grace=0.1)
        await server.close_all_connections()


async def test_oversized_headers_and_truncated_requests_get_no_5xx() -> None:
    handler = ServerSentEventHandler()
    sock, port = bind_unused_port()
    server = make_server(Application([handler.route("/events")]), max_header_size=4096)
    server.add_sockets([sock])
    try:
        good = await EventStreamClient.connect(f"http://127.0.0.1:{port}/events")
        await wait_until(lambda: len(handler) == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert not answer.startswith(b"HTTP/1.1 5")
        writer.close()
        # A request cut off in the middle of its head.
        for cut in (b"GET /ev", b"GET /events HTTP/1.1\r\nHost: x\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(cut)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        # Garbage instead of HTTP.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00\x01\x02 nonsense\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4")
        writer.close()
        handler.send_all(ServerSentEvent(data="unharmed"))
        assert (await good.next_event()).data == "unharmed"
        assert len(handler) == 1
        good.close()
    finally:
        server.stop()
        await handler.shutdown(grace=0.1)
        await server.close_all_connections()


async def test_a_head_over_max_header_size_gets_a_431_and_a_close() -> None:
    handler = ServerSentEventHandler()
    sock, port = bind_unused_port()
    server = make_server(Application([handler.route("/events")]))  # 16 KiB by default
    server.add_sockets([sock])
    try:
        # Just under the bound: an ordinary stream.
        fits = await EventStreamClient.connect(
            f"http://127.0.0.1:{port}/events", headers={"X-Big": "a" * 15_000}
        )
        assert fits.status == 200
        await wait_until(lambda: len(handler) == 1)
        # 20 KB: a head the server will not read. 300 KB: more than it reads
        # before answering, still being sent when the answer goes out.
        for size in (20_000, 300_000):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
            try:
                answer = await read_to_eof(reader, timeout=5)
            finally:
                writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), size
            _, headers = parse_head(head)
            assert headers["Connection"] == "close"
            assert "Date" in headers
            assert int(headers["Content-Length"]) == len(body) > 0
        handler.send_all(ServerSentEvent(data="unharmed"))
        assert (await fits.next_event()).data == "unharmed"
        assert len(handler) == 1
        fits.close()
    finally:
        server.stop()
        await handler.shutdown(grace=0.1)
        await server.close_all_connections()


class _Upload(RequestHandler):
    def post(self) -> None:
        self.write(f"{len(self.request.body)} bytes")


async def test_a_body_sent_too_slowly_gets_a_408_and_a_close() -> None:
    class Denied(ServerSentEventHandler):
        def authorize(self, request: object) -> bool:
            return False

    handler, denied = ServerSentEventHandler(), Denied()
    app = Application([(r"/upload", _Upload), handler.route("/events"), denied.route("/denied")])
    sock, port = bind_unused_port()
    server = make_server(app, body_timeout=0.5)
    server.add_sockets([sock])
    loop = asyncio.get_running_loop()
    try:
        stream = await EventStreamClient.connect(f"http://127.0.0.1:{port}/events")
        await wait_until(lambda: len(handler) == 1)
        # A body that arrives in time is served as usual.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        writer.close()
        # An ordinary handler, and a request to the stream route whose answer
        # waits for the end of its body (a denied GET), each trickled.
        for request in (b"POST /upload", b"GET /denied"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = loop.time()
            writer.write(request + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            slow = asyncio.create_task(trickle(writer, b"x" * 10))
            try:
                answer = await read_to_eof(reader, timeout=1.5)
            finally:
                slow.cancel()
                writer.close()
            elapsed = loop.time() - start
            assert 0.4 <= elapsed <= 1.2, (request, elapsed)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), (request, answer)
            _, headers = parse_head(head)
            assert headers["Connection"] == "close"
            assert "Date" in headers
            assert int(headers["Content-Length"]) == len(body)
        # The stream, open longer than body_timeout, was not touched.
        handler.send_all(ServerSentEvent(data="still here"))
        assert (await stream.next_event()).data == "still here"
        stream.close()
    finally:
        server.stop()
        await handler.shutdown(grace=0.1)
        await server.close_all_connections()


def test_make_server_bounds_request_bodies_by_default() -> None:
    assert inspect.signature(make_server).parameters["body_timeout"].default == 10.0


async def test_authorize_runs_before_any_byte_of_the_stream() -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    class Slow(ServerSentEventHandler):
        async def authorize(self, request: object) -> bool:
            entered.set()
            await release.wait()
            return True

    handler = Slow()
    async with serve([handler.route("/events")], handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(entered.wait(), 5)
        # authorize() is running: the client has nothing, not even the head.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        release.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        writer.close()
