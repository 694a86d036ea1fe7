"""Streams read by real clients over TLS, plain HTTP and a Unix socket.

The servers are this process's (``serve(..., tls=True)``: Tornado's
``HTTPServer(app, ssl_options=...)`` with a ``trustme`` certificate); the
clients are what applications meet in the field: Debian's ``curl``, Python's
``ssl`` module on a socket, ``requests`` (urllib3), and asyncio's Unix-socket
streams. Each client verifies the server's certificate against the test CA:
nothing here turns verification off.

The blocking clients run in threads and hand what they read to the test's loop
through :class:`Received`, so the server (on that loop) keeps serving them.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Generic, TypeVar

import pytest
import requests
from support import serve, tls_certificate, wait_until
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_unix_socket
from tornado.web import Application

from sse_handler import (
    CloseReason,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
)
from sse_handler.parser import EventStreamParser, MessageEvent
from sse_handler.testing import Dechunker, StreamEnded
from sse_handler.transport import SocketTransport, TLSTransport
from sse_handler.writer import FrameWriter, WriteLimits

CURL = Path("/usr/bin/curl")
FAREWELL = ServerSentEvent(event="close", data="bye")

T = TypeVar("T")


class Welcoming(ServerSentEventConnection):
    """Sends a welcome event as soon as it is registered, and records its end."""

    closed: asyncio.Future[CloseReason] | None = None

    def registered(self) -> None:
        self.send(event="welcome", data="hi")

    def connection_closed(self, reason: CloseReason) -> None:
        if Welcoming.closed is not None and not Welcoming.closed.done():
            Welcoming.closed.set_result(reason)


@pytest.fixture(autouse=True)
def _closed() -> Iterator[None]:
    Welcoming.closed = None
    yield
    Welcoming.closed = None


def welcoming_handler() -> ServerSentEventHandler:
    # No keep-alive comments: the only bytes on the wire are the ones a test sends.
    return ServerSentEventHandler(connection_class=Welcoming, keepalive=0)


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test CA's certificate in a PEM file (the one ``serve(tls=True)`` trusts)."""
    return tls_certificate().write_ca(tmp_path_factory.mktemp("ca"))


class Received(Generic[T]):
    """What a blocking client yields in a thread, handed to the loop as it comes.

    ``produce`` runs in the loop's default executor; every item it yields is
    put on an ``asyncio.Queue``; :meth:`next` waits for one under a timeout,
    and raises ``StreamEnded`` once ``produce`` has returned, or what it
    raised (a failed assertion in the client's thread fails the test).
    """

    _END = object()

    def __init__(self, produce: Callable[[], Iterator[T]]) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()

        def run() -> None:
            try:
                for item in produce():
                    loop.call_soon_threadsafe(self._queue.put_nowait, item)
            finally:
                loop.call_soon_threadsafe(self._queue.put_nowait, self._END)

        self._done = loop.run_in_executor(None, run)

    async def next(self, timeout: float = 5.0) -> T:
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is self._END:
            await self._done  # the client's own failure, if it failed
            raise StreamEnded("the client's stream ended")
        return item  # type: ignore[return-value]

    async def rest(self, timeout: float = 5.0) -> list[T]:
        """Everything up to the end of the client's stream."""
        items: list[T] = []
        async with asyncio.timeout(timeout):
            while (item := await self._queue.get()) is not self._END:
                items.append(item)  # type: ignore[arg-type]
        await self._done
        return items


def events_of(body: Iterator[bytes]) -> Iterator[MessageEvent]:
    """The events of a chunked event-stream body, given as it arrives."""
    chunks = Dechunker()
    parser = EventStreamParser()
    for data in body:
        yield from parser.feed(chunks.feed(data))


async def next_event(received: Received[MessageEvent], event: str, data: str) -> MessageEvent:
    got = await received.next()
    assert (got.event, got.data) == (event, data)
    return got


# --- curl ---------------------------------------------------------------------------------


async def test_curl_receives_the_stream_over_tls(ca_file: Path) -> None:
    assert CURL.exists(), f"{CURL} not found: `apt-get install curl` (.ci/run does)"
    handler = welcoming_handler()
    async with serve([handler.route("/events")], handler, tls=True) as server:
        # -N: no output buffering; --cacert: the test CA is the only one trusted.
        curl = await asyncio.create_subprocess_exec(
            str(CURL), "-sSN", "--max-time", "20", "--cacert", str(ca_file),
            f"{server.url}/events",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert curl.stdout is not None and curl.stderr is not None
            stdout = curl.stdout
            parser = EventStreamParser()
            pending: list[MessageEvent] = []

            async def next_from_curl() -> MessageEvent:
                while not pending:
                    data = await asyncio.wait_for(stdout.read(65536), 5)
                    if not data:
                        raise StreamEnded("curl's output ended")
                    pending.extend(parser.feed(data))  # curl removed the chunk framing
                return pending.pop(0)

            welcome = await next_from_curl()
            assert (welcome.event, welcome.data) == ("welcome", "hi")
            conn = handler.connections()[0]
            assert isinstance(conn.writer.transport, TLSTransport)
            assert handler.send_all(data="over TLS", id="1") == 1
            published = await next_from_curl()
            assert (published.id, published.data) == ("1", "over TLS")
            # The server ends the stream (the last chunk): curl exits 0, having
            # seen a complete response.
            handler.stop_all(FAREWELL)
            farewell = await next_from_curl()
            assert (farewell.event, farewell.data) == ("close", "bye")
            assert await asyncio.wait_for(curl.wait(), 5) == 0
            assert await curl.stderr.read() == b""
        finally:
            if curl.returncode is None:
                curl.kill()
            await curl.wait()


# --- Python's ssl module ------------------------------------------------------------------


async def test_python_ssl_client_receives_the_stream(ca_file: Path) -> None:
    handler = welcoming_handler()
    async with serve([handler.route("/events")], handler, tls=True) as server:
        port = server.port

        def stream() -> Iterator[MessageEvent]:
            context = ssl.create_default_context(cafile=str(ca_file))
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                assert sock.version() is not None
                sock.sendall(
                    b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
                )
                head = b""
                while b"\r\n\r\n" not in head:
                    data = sock.recv(65536)
                    assert data, "no response head"
                    head += data
                head, _, body = head.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                assert b"transfer-encoding: chunked" in head.lower()
                yield from events_of(itertools.chain([body], iter(lambda: sock.recv(65536), b"")))

        received = Received(stream)
        await next_event(received, "welcome", "hi")
        assert isinstance(handler.connections()[0].writer.transport, TLSTransport)
        handler.send_all(data="over TLS", id="1")
        assert (await next_event(received, "message", "over TLS")).id == "1"
        handler.stop_all(FAREWELL)
        assert [(e.event, e.data) for e in await received.rest()] == [("close", "bye")]


# --- requests (urllib3) -------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_requests_sees_each_event_as_soon_as_it_is_sent(tls: bool, ca_file: Path) -> None:
    # urllib3 reads a close-delimited body in blocks (iter_lines: 512 bytes):
    # the welcome, far shorter, would wait there until the stream ends. A
    # chunked body hands it over at once, chunk by chunk. Nothing but the
    # welcome is sent until it has arrived (no keep-alive comments).
    handler = welcoming_handler()
    async with serve([handler.route("/events")], handler, tls=tls) as server:
        url = f"{server.url}/events"

        def stream() -> Iterator[bytes]:
            with requests.get(
                url,
                stream=True,
                verify=str(ca_file),
                timeout=5,
                headers={"Accept": "text/event-stream"},
            ) as response:
                assert response.status_code == 200
                assert response.headers["Transfer-Encoding"] == "chunked"
                yield from response.iter_lines()

        lines = Received(stream)
        assert [await lines.next() for _ in range(3)] == [b": ok", b"event: welcome", b"data: hi"]
        assert await lines.next() == b""  # the blank line that dispatches the event
        conn = handler.connections()[0]
        assert isinstance(conn.writer.transport, TLSTransport if tls else SocketTransport)
        assert not conn.writer.pending  # nothing else is on its way
        handler.send_all(data="second", id="2")
        assert [await lines.next() for _ in range(3)] == [b"id: 2", b"data: second", b""]
        handler.stop_all(FAREWELL)
        assert await lines.rest() == [b"event: close", b"data: bye", b""]


# --- a Unix socket ------------------------------------------------------------------------


@asynccontextmanager
async def serve_unix(handler: ServerSentEventHandler) -> AsyncIterator[str]:
    """Serve ``handler`` at ``/events`` on a Unix socket; yields the socket's path."""
    # A short folder: a Unix socket's path is limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="sse-") as folder:
        path = str(Path(folder) / "sse.sock")
        server = HTTPServer(Application([handler.route("/events")]))
        server.add_socket(bind_unix_socket(path))
        try:
            yield path
        finally:
            server.stop()
            await handler.shutdown(grace=0.2)
            await server.close_all_connections()


async def test_unix_socket_server_streams_events() -> None:
    handler = welcoming_handler()
    async with serve_unix(handler) as path:
        Welcoming.closed = asyncio.get_running_loop().create_future()
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"transfer-encoding: chunked" in head.lower()
            chunks, parser = Dechunker(), EventStreamParser()
            pending: list[MessageEvent] = []

            async def next_event() -> MessageEvent:
                while not pending:
                    data = await asyncio.wait_for(reader.read(65536), 5)
                    if not data:
                        raise StreamEnded("the server closed the stream")
                    pending.extend(parser.feed(chunks.feed(data)))
                return pending.pop(0)

            welcome = await next_event()
            assert (welcome.event, welcome.data) == ("welcome", "hi")
            conn = handler.connections()[0]
            transport = conn.writer.transport
            assert type(transport) is SocketTransport
            assert transport.sock.family == socket.AF_UNIX
            assert handler.send_all(data="over a Unix socket", id="1") == 1
            event = await next_event()
            assert (event.id, event.data) == ("1", "over a Unix socket")
        finally:
            writer.close()
        # The client's close is seen on a Unix socket too.
        assert await asyncio.wait_for(Welcoming.closed, 2) == CloseReason.CLIENT_CLOSED
        await wait_until(lambda: len(handler) == 0)


class _RenegotiatingSocket:
    """An SSLSocket stand-in whose first write needs a read first (what OpenSSL
    says during a renegotiation the peer began): a real socket underneath for
    the IOLoop, TLS replaced because a renegotiation cannot be provoked from
    Python's ssl client (TLS 1.3 has none)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends: list[bytes] = []
        self.attempts = 0
        self.blocked = True

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, data: bytes | memoryview) -> int:
        self.attempts += 1
        if self.blocked:
            raise ssl.SSLWantReadError("read first")
        self.sends.append(bytes(data))
        return len(data)

    def recv(self, size: int) -> bytes:
        self.blocked = False
        return self._sock.recv(size)

    def close(self) -> None:
        self._sock.close()


async def test_a_tls_write_that_must_read_first_waits_for_readable_not_writable() -> None:
    server_end, client_end = socket.socketpair()
    server_end.setblocking(False)
    fake = _RenegotiatingSocket(server_end)
    transport = TLSTransport(fake, IOLoop.current())  # type: ignore[arg-type]
    closed: list[CloseReason] = []
    writer = FrameWriter(
        transport, WriteLimits(), chunked=False, name="t", on_closed=closed.append
    )
    writer.release()
    writer.send(b"data: x\n\n")
    assert writer.pending
    # The socket is writable all along: a writer woken by writability would
    # retry the send on every turn of the loop for this whole window.
    await asyncio.sleep(0.05)
    assert (fake.attempts, fake.sends) == (2, [])  # the fast path, the I/O task's try
    client_end.send(b"tls records")  # the peer's part of the renegotiation
    await asyncio.wait_for(writer.flush(), 5)
    assert fake.sends == [b"data: x\n\n"]
    assert fake.attempts == 3
    writer.close(CloseReason.STOPPED)
    client_end.close()
