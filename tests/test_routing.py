"""The routing target: what the endpoint answers before any stream opens.

Every request here goes over a real socket, several of them over one
keep-alive connection, to show that an answer that is not a stream leaves the
connection usable and every other stream untouched.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest
from support import parse_head, read_to_eof, serve, trickle, wait_until
from tornado.httputil import HTTPServerRequest
from tornado.web import Application, HTTPError, url

from sse_handler import EventStreamRoute, ServerSentEvent, ServerSentEventHandler


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[bytes, bytes]:
    """Send one request; read one complete, Content-Length framed answer."""
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    if request.startswith(b"HEAD "):
        return head, b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return head, body


async def test_other_methods_get_405_with_allow_and_the_connection_stays_usable() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for method in (b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"):
            head, answer = await _exchange(
                reader,
                writer,
                method + b" /events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            )
            assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), method
            # OPTIONS is only allowed when CORS is on (see the next test).
            assert b"Allow: GET, HEAD\r\n" in head
            assert answer == b"405: Method Not Allowed\n"
        # The same connection then opens a stream.
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        await wait_until(lambda: len(handler) == 1)
        handler.send_all(ServerSentEvent(data="after"))
        assert b"data: after\n\n" in await asyncio.wait_for(reader.readuntil(b"after\n\n"), 5)
        writer.close()


async def test_with_cors_options_is_allowed_too() -> None:
    handler = ServerSentEventHandler(cors_origins=["https://app.example"])
    async with serve([handler.route("/events")], handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head, _ = await _exchange(reader, writer, b"DELETE /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405 ")
        assert b"Allow: GET, HEAD, OPTIONS\r\n" in head
        preflight = (
            b"OPTIONS /events HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n"
            b"Access-Control-Request-Method: GET\r\n\r\n"
        )
        head, body = await _exchange(reader, writer, preflight)
        assert head.startswith(b"HTTP/1.1 204 No Content\r\n")
        assert b"Access-Control-Allow-Origin: https://app.example\r\n" in head
        assert body == b""
        writer.close()


async def test_head_gets_the_stream_head_without_a_body_and_opens_no_stream() -> None:
    class Tagged(ServerSentEventHandler):
        def response_headers(self, request: HTTPServerRequest) -> dict[str, str]:
            return {"X-Stream": "events"}

    # One connection at most: the HEADs must not take the only place.
    handler = Tagged(max_connections=1, cors_origins=["https://app.example"])
    async with serve([handler.route("/events")], handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(2):  # keep-alive: HEAD, HEAD, then GET on one connection
            writer.write(
                b"HEAD /events HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            status, headers = parse_head(head)
            assert status == 200, head
            assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert headers["Cache-Control"] == "no-cache"
            assert headers["X-Accel-Buffering"] == "no"
            assert headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert headers["Vary"] == "Origin"
            assert headers["X-Stream"] == "events"
            assert "Date" in headers
            assert "Transfer-Encoding" not in headers
        assert len(handler) == 0
        assert handler.counters.opened == 0
        # No body followed either head: what comes next is the GET's answer,
        # and the cap of one still has room for it.
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        # The first chunk of the body: the opening comment line.
        assert await asyncio.wait_for(reader.readuntil(b": ok\n\r\n"), 5) == b"5\r\n: ok\n\r\n"
        await wait_until(lambda: len(handler) == 1)
        writer.close()


async def test_head_runs_authorize_and_is_denied_like_get() -> None:
    asked: list[str] = []

    class Guarded(ServerSentEventHandler):
        async def authorize(self, request: HTTPServerRequest) -> bool:
            asked.append(request.method or "")
            token = request.headers.get("Authorization")
            if token is None:
                raise HTTPError(401)
            return token == "Bearer ok"

    handler = Guarded()
    async with serve([handler.route("/events")], handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for auth, status in ((b"", 401), (b"Authorization: Bearer no\r\n", 403)):
            answers = []
            for method in (b"GET", b"HEAD"):
                head, _ = await _exchange(
                    reader, writer, method + b" /events HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
                )
                answers.append(parse_head(head)[0])
            assert answers == [status, status]
        head, _ = await _exchange(
            reader, writer, b"HEAD /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ok\r\n\r\n"
        )
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert asked == ["GET", "HEAD", "GET", "HEAD", "HEAD"]
        assert len(handler) == 0
        writer.close()


async def test_answers_that_are_not_streams_carry_a_date() -> None:
    class Guarded(ServerSentEventHandler):
        def authorize(self, request: HTTPServerRequest) -> bool:
            return "deny" not in request.query_arguments

    handler = Guarded(cors_origins=["https://app.example"])
    async with serve([handler.route("/events")], handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        requests = {
            405: b"DELETE /events HTTP/1.1\r\nHost: x\r\n\r\n",
            204: b"OPTIONS /events HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n",
            403: b"GET /events?deny=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            400: b"GET /events?last_event_id=%FF HTTP/1.1\r\nHost: x\r\n\r\n",
        }
        for expected, request in requests.items():
            head, _ = await _exchange(reader, writer, request)
            status, headers = parse_head(head)
            assert status == expected
            assert "Date" in headers, expected
            sent = parsedate_to_datetime(headers["Date"])
            assert abs((sent - datetime.now(UTC)).total_seconds()) < 5
        writer.close()


async def test_a_request_with_a_large_body_gets_405_at_once_and_a_close() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        loop = asyncio.get_running_loop()
        for framing, piece in (
            (b"Content-Length: 10000000", b"x" * 10),
            (b"Transfer-Encoding: chunked", b"a\r\n" + b"x" * 10 + b"\r\n"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            start = loop.time()
            writer.write(b"POST /events HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
            slow = asyncio.create_task(trickle(writer, piece))
            try:
                # Answered without waiting for the body, and closed by the server.
                answer = await read_to_eof(reader, timeout=1.0)
            finally:
                slow.cancel()
                writer.close()
            assert loop.time() - start < 1.0
            head, _, body = answer.partition(b"\r\n\r\n")
            status, headers = parse_head(head)
            assert status == 405, framing
            assert headers["Allow"] == "GET, HEAD"
            assert headers["Connection"] == "close"
            assert "Date" in headers
            assert body == b"405: Method Not Allowed\n"
            assert int(headers["Content-Length"]) == len(body)
        assert len(handler) == 0


async def test_a_hook_that_raises_before_the_stream_answers_500_and_harms_no_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(ServerSentEventHandler):
        def channels_for(
            self, request: HTTPServerRequest, path_kwargs: dict[str, str]
        ) -> list[str]:
            if "channels" in request.query_arguments:
                raise RuntimeError("channels_for failed")
            return super().channels_for(request, path_kwargs)

        async def authorize(self, request: HTTPServerRequest) -> None:
            if "authorize" in request.query_arguments:
                raise RuntimeError("authorize failed")
            if "headers" in request.query_arguments:
                self.response_headers = lambda request: {"X-Bad": "a\r\nb"}  # type: ignore[method-assign]

    handler = Broken()
    async with serve([handler.route("/events")], handler) as server:
        good = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        with caplog.at_level(logging.ERROR, logger="sse_handler"):
            for query in ("channels", "authorize", "headers"):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                head, body = await _exchange(
                    reader, writer, f"GET /events?{query}=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                )
                assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), query
                assert body == b"500: Internal Server Error\n"
                writer.close()
        assert sum("Uncaught exception while accepting" in r.message for r in caplog.records) == 3
        assert len(handler) == 1
        handler.send_all(ServerSentEvent(data="unharmed"))
        assert (await good.next_event()).data == "unharmed"
        good.close()


async def test_http_errors_carry_their_status_and_reason() -> None:
    class Guarded(ServerSentEventHandler):
        def authorize(self, request: HTTPServerRequest) -> None:
            raise HTTPError(429, reason="Slow Down")

    handler = Guarded()
    async with serve([handler.route("/events")], handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head, body = await _exchange(reader, writer, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429 Slow Down\r\n")
        assert body == b"429: Slow Down\n"
        writer.close()
        assert len(handler) == 0


async def test_invalid_utf8_in_the_path_or_last_event_id_is_a_400() -> None:
    handler = ServerSentEventHandler()
    routes = [handler.route(r"/rooms/(?P<channel>[^/]+)"), handler.route("/events")]
    async with serve(routes, handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for path in (b"/rooms/%FF%FE", b"/events?last_event_id=%FF"):
            head, _ = await _exchange(
                reader, writer, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            assert head.startswith(b"HTTP/1.1 400 "), path
        writer.close()
        # A valid percent-encoded room name reaches channels_for decoded.
        client = await server.stream("/rooms/caf%C3%A9")
        await wait_until(lambda: len(handler) == 1)
        (conn,) = handler.connections()
        assert conn.channels == {"café"}
        client.close()


async def test_a_named_route_reverses_and_serves() -> None:
    handler = ServerSentEventHandler()
    app = Application([url(r"/rooms/(?P<channel>\w+)", EventStreamRoute(handler), name="room")])
    assert app.reverse_url("room", "lobby") == "/rooms/lobby"
    async with serve(app, handler) as server:
        client = await server.stream(app.reverse_url("room", "lobby"))
        await wait_until(lambda: len(handler) == 1)
        assert handler.connections()[0].channels == {"lobby"}
        await handler.publish("lobby", ServerSentEvent(data="hi"))
        assert (await client.next_event()).data == "hi"
        client.close()
