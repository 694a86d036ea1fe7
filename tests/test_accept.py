"""make_server() takes a stream request off the socket (sse_handler.accept; the default).

A GET that the application routes to a stream endpoint, whose whole head is
on the socket when the connection is accepted, never reaches Tornado's
HTTP/1 connection; anything else goes to Tornado untouched. These tests pin
both halves: that the direct path is taken when it should be (the request's
connection is a ``DirectConnection``), that it answers as Tornado's path
does, and that every other request still gets Tornado's own answer.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import parse_head, read_to_eof, wait_until
from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.netutil import bind_unix_socket
from tornado.testing import bind_unused_port
from tornado.web import Application, HTTPError, RequestHandler

from sse_handler import ServerSentEventConnection, ServerSentEventHandler
from sse_handler.accept import DirectConnection, simple_headers
from sse_handler.server import BoundedHTTPServer, make_server
from sse_handler.writer import Transport


class Spy(ServerSentEventHandler):
    """Remembers the kind of connection each stream request came on, and its address."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.came_on: list[type] = []
        self.remote_ips: list[str | None] = []
        #: What the access log prints for the connection.
        self.contexts: list[str] = []

    def get_connection_impl(
        self,
        request: HTTPServerRequest,
        cid: str,
        transport: Transport,
        last_event_id: str | None,
    ) -> ServerSentEventConnection:
        self.came_on.append(type(request.connection))
        self.remote_ips.append(request.remote_ip)
        self.contexts.append(str(request.connection.context))  # type: ignore[attr-defined]
        return super().get_connection_impl(request, cid, transport, last_event_id)


class Hello(RequestHandler):
    def get(self) -> None:
        self.write("hello")

    def post(self) -> None:
        self.write(b"got " + self.request.body)


@asynccontextmanager
async def serving(
    handler: ServerSentEventHandler, **kwargs: Any
) -> AsyncIterator[tuple[int, BoundedHTTPServer]]:
    """A server of ``handler`` at ``/events`` and of ``Hello`` at ``/hello``: its port, itself."""
    sock, port = bind_unused_port()
    app = Application([handler.route("/events"), (r"/hello", Hello)])
    server = make_server(app, **{"direct_accept": True, **kwargs})
    server.add_sockets([sock])
    try:
        yield port, server
    finally:
        server.stop()
        await handler.shutdown(grace=0.2)
        await server.close_all_connections()


@asynccontextmanager
async def server_for(handler: ServerSentEventHandler, **kwargs: Any) -> AsyncIterator[int]:
    async with serving(handler, **kwargs) as (port, _):
        yield port


async def sent(port: int, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose ``request`` is on the socket before the server can
    accept it: the connect and the send are done before this loop (the
    server's) runs again."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request)
    return await asyncio.open_connection(sock=sock)


async def exchange(port: int, request: bytes, until: bytes = b"\r\n\r\n") -> bytes:
    """Send ``request`` (there at the accept) and read until ``until`` has arrived."""
    reader, writer = await sent(port, request)
    try:
        async with asyncio.timeout(5):
            return await reader.readuntil(until)
    finally:
        writer.close()


async def test_a_stream_request_is_taken_off_the_socket() -> None:
    handler = Spy()
    async with server_for(handler) as port:
        data = await exchange(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", b": ok\n")
        status, headers = parse_head(data.partition(b"\r\n\r\n")[0] + b"\r\n")
        assert status == 200
        assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert headers["Transfer-Encoding"] == "chunked"
        assert "Date" in headers
        await wait_until(lambda: handler.counters.opened == 1)
    assert handler.came_on == [DirectConnection]


async def test_http_1_0_gets_a_close_delimited_stream() -> None:
    handler = Spy()
    async with server_for(handler) as port:
        data = await exchange(port, b"GET /events HTTP/1.0\r\n\r\n", b": ok\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert "Transfer-Encoding" not in parse_head(head + b"\r\n")[1]
        assert body == b": ok\n"
    assert handler.came_on == [DirectConnection]


@pytest.mark.parametrize(
    ("request_bytes", "direct"),
    [
        # a head that is not all there when the connection is accepted: Tornado's
        pytest.param(None, False, id="head-in-two-pieces"),
        # a body declared on a GET: Tornado reads it
        pytest.param(
            b"GET /events HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            False,
            id="get-with-body",
        ),
        # an empty line before the request is skipped, as Tornado does (RFC 9112 section 2.2)
        pytest.param(b"\r\nGET /events HTTP/1.1\r\nHost: x\r\n\r\n", True, id="leading-crlf"),
        # bare LF line ends, which Tornado accepts too
        pytest.param(b"GET /events HTTP/1.1\nHost: x\n\n", True, id="bare-lf"),
    ],
)
async def test_every_stream_request_opens_a_stream_on_one_path_or_the_other(
    request_bytes: bytes | None, direct: bool
) -> None:
    handler = Spy()
    async with server_for(handler) as port:
        if request_bytes is None:
            reader, writer = await sent(port, b"GET /events HTTP/1.1\r\nHo")
            await asyncio.sleep(0.1)  # the server accepts and sees half a head
            writer.write(b"st: x\r\n\r\n")
        else:
            reader, writer = await sent(port, request_bytes)
        async with asyncio.timeout(5):
            data = await reader.readuntil(b": ok\n")
        writer.close()
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        await wait_until(lambda: handler.counters.opened == 1)
    assert (handler.came_on[0] is DirectConnection) is direct


async def test_a_request_sent_after_the_accept_is_served_by_tornado() -> None:
    handler = Spy()
    async with server_for(handler) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)  # accepted with nothing to read yet
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b": ok\n")).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        await wait_until(lambda: handler.counters.opened == 1)
    assert handler.came_on[0] is not DirectConnection


async def test_other_routes_and_methods_keep_tornados_answers_and_keep_alive() -> None:
    handler = Spy()
    async with server_for(handler) as port:
        # Two requests on one connection: the first is peeked and left to Tornado.
        reader, writer = await sent(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"hello")).startswith(b"HTTP/1.1 200 OK")
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"hello")).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        head = await exchange(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404 ")
        head = await exchange(port, b"HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"text/event-stream" in head
        head = await exchange(
            port, b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        assert head.startswith(b"HTTP/1.1 405 ")
    assert handler.came_on == []


@pytest.mark.parametrize(
    ("request_bytes", "answer"),
    [
        (b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde", b"got abcde"),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Long: " + b"y" * 6000 + b"\r\n\r\n", b"hello"),
        (
            b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n",
            b"hello",
        ),
    ],
    ids=["a-body", "a-head-past-the-first-read", "two-pipelined"],
)
async def test_a_request_left_to_tornado_reaches_it_whole(
    request_bytes: bytes, answer: bytes
) -> None:
    """A request the direct accept looks at and leaves to Tornado reaches
    Tornado whole: a body after the head, a head longer than the first
    look, a second request pipelined behind the first."""
    handler = Spy()
    async with server_for(handler) as port:
        reader, writer = await sent(port, request_bytes)
        async with asyncio.timeout(5):
            data = await reader.readuntil(answer)
            if request_bytes.count(b"GET /hello") == 2:
                data += await reader.readuntil(answer)
        writer.close()
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.count(b"HTTP/1.1 200 OK") == request_bytes.count(b"HTTP/1.1\r\n")
    assert handler.came_on == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /events HTTP/1.1\r\n\r\n",  # no Host
        b"GET /events HTTP/1.1\r\nHost: a,b\r\n\r\n",  # two hosts
        b"GET /events HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"GET /events?x=%ZZ&&= HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n",
    ],
    ids=["no-host", "two-hosts", "bad-header-line", "control-character"],
)
async def test_a_malformed_head_gets_tornados_400_and_no_stream(request_bytes: bytes) -> None:
    handler = Spy()
    async with server_for(handler) as port:
        reader, writer = await sent(port, request_bytes)
        data = await read_to_eof(reader, timeout=5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 400 ")
    assert handler.came_on == []
    assert handler.counters.opened == 0


class Refusing(Spy):
    def authorize(self, request: HTTPServerRequest) -> bool:
        status = int(request.query_arguments["status"][0])
        if status == 403:
            return False
        raise HTTPError(status)


@pytest.mark.parametrize("status", [401, 403, 204])
async def test_a_refusal_on_the_direct_path_is_answered_and_closed(status: int) -> None:
    handler = Refusing()
    async with server_for(handler) as port:
        request = f"GET /events?status={status} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        reader, writer = await sent(port, request)
        data = await read_to_eof(reader, timeout=5)  # closed after the answer, not reset
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    got, headers = parse_head(head + b"\r\n")
    assert got == status
    assert headers["Connection"] == "close"
    assert "Date" in headers
    assert int(headers.get("Content-Length", "0")) == len(body)
    assert handler.came_on == []
    assert handler.counters.opened == 0


async def test_the_per_address_cap_sheds_on_the_direct_path() -> None:
    handler = Spy(max_connections_per_ip=1)
    async with server_for(handler) as port:
        first = await exchange(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", b": ok\n")
        assert first.startswith(b"HTTP/1.1 200")
        reader, writer = await sent(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await read_to_eof(reader, timeout=5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200 OK")
        assert b"retry: " in data
        assert data.endswith(b"0\r\n\r\n")  # the chunked body's end: the stream is over


@pytest.mark.parametrize(
    ("headers", "trusted", "expected"),
    [
        ("X-Real-Ip: 10.0.0.7\r\n", [], "10.0.0.7"),
        ("X-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n", [], "10.0.0.2"),
        ("X-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n", ["10.0.0.2"], "10.0.0.1"),
        ("X-Real-Ip: not-an-address\r\n", [], "127.0.0.1"),
        ("", [], "127.0.0.1"),
    ],
    ids=["real-ip", "forwarded-for", "trusted-hop", "invalid", "none"],
)
async def test_xheaders_give_the_same_remote_ip_as_tornados_path(
    headers: str, trusted: list[str], expected: str
) -> None:
    """The same request through both paths: the direct one, then one whose
    head arrives after the accept (Tornado's)."""
    handler = Spy()
    request = f"GET /events HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    async with server_for(handler, xheaders=True, trusted_downstream=trusted) as port:
        await exchange(port, request, b": ok\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        writer.write(request)
        async with asyncio.timeout(5):
            await reader.readuntil(b": ok\n")
        writer.close()
        await wait_until(lambda: handler.counters.opened == 2)
    assert handler.came_on[0] is DirectConnection
    assert handler.came_on[1] is not DirectConnection
    assert handler.remote_ips == [expected, expected]


@pytest.mark.parametrize("direct", [True, False])
async def test_a_unix_socket_stream_is_taken_directly(tmp_path: Any, direct: bool) -> None:
    handler = Spy()
    path = str(tmp_path / "sse.sock")
    server = make_server(Application([handler.route("/events")]), direct_accept=direct)
    server.add_socket(bind_unix_socket(path))
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b": ok\n")).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        await wait_until(lambda: handler.counters.opened == 1)
    finally:
        server.stop()
        await handler.shutdown(grace=0.2)
    assert (handler.came_on[0] is DirectConnection) is direct
    assert handler.remote_ips == ["0.0.0.0"]
    # What the access log prints: the socket's address, on both paths (an
    # unnamed client socket's is empty), not an IP it never had.
    assert handler.contexts == [""]


async def test_pipelined_bytes_after_a_stream_request_are_dropped() -> None:
    handler = Spy()
    async with server_for(handler) as port:
        pipelined = b"GET /events HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\n\r\n"
        reader, writer = await sent(port, pipelined)
        async with asyncio.timeout(5):
            await reader.readuntil(b": ok\n")
        await wait_until(lambda: len(handler) == 1)
        handler.send_all(data="after")
        async with asyncio.timeout(5):
            assert b"data: after" in await reader.readuntil(b"data: after\n")
        writer.close()
    assert handler.came_on == [DirectConnection]


async def test_a_client_that_leaves_during_an_async_authorize_is_released_once() -> None:
    entered = asyncio.Event()
    released: list[str] = []

    class Slow(Spy):
        async def authorize(self, request: HTTPServerRequest) -> bool:
            entered.set()
            await asyncio.sleep(0.3)
            return True

        def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
            released.append(conn.cid)

    handler = Slow()
    async with server_for(handler) as port:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # there at the accept
        await asyncio.wait_for(entered.wait(), 5)
        sock.close()
        await wait_until(lambda: len(released) == 1, timeout=5)
        await asyncio.sleep(0.1)
        assert len(released) == 1
        assert len(handler) == 0
        assert handler.stats().closed == {"client_closed": 1}
    assert handler.came_on == [DirectConnection]


async def test_direct_accept_can_be_turned_off() -> None:
    handler = Spy()
    async with server_for(handler, direct_accept=False) as port:
        await exchange(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", b": ok\n")
        await wait_until(lambda: handler.counters.opened == 1)
    assert handler.came_on[0] is not DirectConnection


def test_a_tls_server_reads_every_request_with_tornado() -> None:
    from support import tls_certificate

    server = make_server(Application([]), ssl_options=tls_certificate().server_context())
    assert isinstance(server, BoundedHTTPServer)
    assert server.direct is None


# --- failures on the way in ------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "tornado"])
async def test_a_cancelled_async_authorize_gives_its_slot_back(direct: bool) -> None:
    """authorize() awaits a shared lookup that someone cancels: no stream, the
    client's connection closed, and the slot under the cap given back."""

    class CancelledLookup(Spy):
        cancel = 2

        async def authorize(self, request: HTTPServerRequest) -> bool:
            if self.cancel:
                self.cancel -= 1
                lookup = asyncio.get_running_loop().create_future()
                lookup.cancel()
                await lookup
            return True

    handler = CancelledLookup(max_connections_per_ip=2)
    async with server_for(handler, direct_accept=direct) as port:
        for _ in range(2):
            reader, writer = await sent(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await read_to_eof(reader, timeout=5) == b""  # closed, not left waiting
            writer.close()
        # Both slots are free again: two streams open.
        first = await exchange(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", b": ok\n")
        reader, writer = await sent(port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            second = await reader.readuntil(b": ok\n")
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert second.startswith(b"HTTP/1.1 200 OK")
    assert b"retry:" not in second
    assert handler.counters.opened == 2


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "tornado"])
async def test_a_host_whose_port_cannot_be_read_is_answered_by_tornado(direct: bool) -> None:
    """A Host port too long for int() makes HTTPServerRequest raise ValueError:
    the direct path leaves the request to Tornado, which ends the connection."""
    handler = Spy()
    async with server_for(handler, direct_accept=direct) as port:
        request = b"GET /events HTTP/1.1\r\nHost: a:" + b"9" * 5000 + b"\r\n\r\n"
        reader, writer = await sent(port, request)
        data = await read_to_eof(reader, timeout=5)
        writer.close()
    assert data == b"" or data.startswith(b"HTTP/1.1 400 ")
    assert handler.counters.opened == 0


def test_the_direct_accept_is_the_default() -> None:
    assert make_server(Application([])).direct is not None
    assert make_server(Application([]), direct_accept=False).direct is None


_NAME_CHARS = "aZ09-_!#~.:\t \r\x00é"
_VALUE_CHARS = 'aZ09 \t:;,=/"()\x7f\x80\xff\r\x00é\u0100'


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(_NAME_CHARS, min_size=0, max_size=6),
            st.text(_VALUE_CHARS, min_size=0, max_size=8),
            st.sampled_from(["\r\n", "\n"]),
        ),
        max_size=5,
    ),
    st.sampled_from(["\r\n", "\n"]),
)
def test_the_quick_header_parse_agrees_with_tornados(
    lines: list[tuple[str, str, str]], end: str
) -> None:
    """simple_headers() either declines (Tornado's parse decides) or gives
    exactly what Tornado's parse gives, for heads Tornado accepts."""
    text = "".join(f"{name}:{value}{eol}" for name, value, eol in lines) + end
    quick = simple_headers(text)
    if quick is None:
        return
    assert list(quick.get_all()) == list(HTTPHeaders.parse("\n" + text).get_all())


def test_the_quick_header_parse_takes_the_usual_heads_and_declines_the_rest() -> None:
    usual = "Host: a:1\r\nAccept: text/event-stream\r\nLast-Event-ID: 17-0\r\n\r\n"
    assert dict(simple_headers(usual) or {}) == {
        "Host": "a:1",
        "Accept": "text/event-stream",
        "Last-Event-Id": "17-0",
    }
    for declined in (
        "Cookie: a=1\r\ncookie: b=2\r\n\r\n",  # a name twice: Tornado keeps both
        "X: a\r\n  folded\r\n\r\n",  # obs-fold: Tornado refuses it
        "Bad Name: x\r\n\r\n",
        "X: a\x00b\r\n\r\n",
    ):
        assert simple_headers(declined) is None, declined


async def test_a_burst_of_new_streams_is_served_a_few_per_turn_of_the_loop() -> None:
    """Tornado accepts up to 128 connections at once; they are served at most
    per_turn (16) per turn of the loop, so that other streams' events are not
    held back for the whole burst."""
    handler = Spy()
    async with server_for(handler) as port:
        socks = []
        for _ in range(120):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        try:
            seen = [len(handler)]
            for _ in range(2000):
                await asyncio.sleep(0)
                seen.append(len(handler))
                if seen[-1] == len(socks):
                    break
            assert seen[-1] == len(socks)
            steps = [b - a for a, b in itertools.pairwise(seen)]
            assert max(steps) <= 16, steps
            assert sum(1 for step in steps if step) >= len(socks) // 16
        finally:
            for sock in socks:
                sock.close()


async def test_a_burst_of_mixed_requests_gets_each_its_own_answer() -> None:
    """A turn serves its batch in phases (peek all, route all, serve each):
    streams, requests for Tornado, heads not there yet and clients already
    gone, interleaved in one burst, each get what they would get alone."""
    handler = Spy()
    async with server_for(handler) as port:
        kinds = ["stream", "hello", "late", "gone"] * 8
        socks = []
        for kind in kinds:
            sock = socket.create_connection(("127.0.0.1", port))
            if kind == "stream":
                sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            elif kind == "hello":
                sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            elif kind == "late":
                sock.sendall(b"GET /hello HTTP/1.1\r\n")  # the rest comes later
            else:
                sock.close()  # before the server accepts it, having sent nothing
            socks.append(sock)
        try:
            # The batch is served (its streams open) before the late heads end.
            await wait_until(lambda: handler.counters.opened == 8)
            for kind, sock in zip(kinds, socks, strict=True):
                if kind == "late":
                    sock.sendall(b"Host: x\r\n\r\n")
            answers = []
            for kind, sock in zip(kinds, socks, strict=True):
                if kind == "gone":
                    continue
                reader, writer = await asyncio.open_connection(sock=sock)
                async with asyncio.timeout(5):
                    head = await reader.readuntil(b"\r\n\r\n")
                    body = await reader.readuntil(b"ok" if kind == "stream" else b"hello")
                answers.append((kind, head, body))
                writer.close()
            for kind, head, body in answers:
                status, headers = parse_head(head)
                assert status == 200, (kind, head)
                if kind == "stream":
                    assert headers["Content-Type"].startswith("text/event-stream")
                else:
                    assert body.endswith(b"hello"), body
            assert len(answers) == 24
            assert handler.counters.opened == 8  # none for the clients gone
        finally:
            for sock in socks:
                sock.close()


async def test_a_head_seen_before_gets_a_request_of_its_own() -> None:
    """The third stream of the same head bytes is built from the second one's
    request (sse_handler.heads: kept the second time), with its own client
    address."""
    handler = Spy()
    head = b"GET /events?channel=a HTTP/1.1\r\nHost: x\r\n\r\n"
    clients = []
    async with serving(handler) as (port, server):
        assert server.direct is not None
        try:
            for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                client = socket.socket()
                client.bind((source, 0))
                client.connect(("127.0.0.1", port))
                client.sendall(head)
                clients.append(client)
                await wait_until(lambda: handler.counters.opened == len(clients))
            assert len(server.direct.seen_heads) == 1
            assert handler.remote_ips == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            assert [c.query_arguments for c in handler.connections()] == [{"channel": [b"a"]}] * 3
        finally:
            for client in clients:
                client.close()


async def test_heads_that_differ_in_their_query_each_get_their_own_arguments() -> None:
    """Streams on channels of their own, with one client's headers: from the
    second, each request is made from the kept one (sse_handler.heads) and
    routed from the memo (sse_handler.route_memo), with its own channel."""
    handler = Spy()
    clients = []
    async with serving(handler) as (port, server):
        assert server.direct is not None
        try:
            for n in range(5):
                client = socket.socket()
                client.connect(("127.0.0.1", port))
                client.sendall(b"GET /events?channel=c%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
                clients.append(client)
                await wait_until(lambda: handler.counters.opened == len(clients))
            assert len(server.direct.seen_heads) == 1
            assert len(server.direct.routes) == 1
            assert [c.query_arguments for c in handler.connections()] == [
                {"channel": [b"c%d" % n]} for n in range(5)
            ]
        finally:
            for client in clients:
                client.close()
        # Another path with the same headers is routed by the application.
        answer = await exchange(port, b"GET /hello?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", b"hello")
        assert answer.startswith(b"HTTP/1.1 200")
