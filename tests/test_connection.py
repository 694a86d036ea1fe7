"""The write path of one connection: fast path, queue, bounds, deadline, sources.

Every test runs three ways, as Tornado's ``TestIOStream`` / ``TestIOStreamSSL``
do: over plain TCP with the request read by Tornado (id ``plain``:
``HTTPServer(app)``), over plain TCP with the request taken off the socket
by :mod:`sse_handler.accept` (id ``direct``: ``make_server(app)``), and over TLS
(id ``tls``: ``HTTPServer(app, ssl_options=...)``, so the stream's transport
is a ``TLSTransport`` over the ``ssl.SSLSocket`` Tornado's handshake left).
Raw clients are plain sockets or ``ssl.SSLSocket`` objects that did the
handshake; both are read by :func:`read_all`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any, ClassVar, NamedTuple

import pytest
from support import Server, serve, wait_until
from tornado.ioloop import IOLoop
from tornado.platform.asyncio import BaseAsyncIOLoop

from sse_handler import (
    CloseReason,
    OverflowPolicy,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
)
from sse_handler.connection import Sendable
from sse_handler.parser import EventStreamParser
from sse_handler.testing import Dechunker
from sse_handler.transport import SocketTransport, TLSTransport
from sse_handler.writer import chunk

BIG = "x" * 65536


class Closing(ServerSentEventConnection):
    reasons: ClassVar[list[CloseReason]] = []

    def connection_closed(self, reason: CloseReason) -> None:
        Closing.reasons.append(reason)


@pytest.fixture(autouse=True)
def _reset() -> None:
    Closing.reasons = []


class Way(NamedTuple):
    """How this module's servers take a stream: over TLS, or read directly."""

    tls: bool
    direct: bool


@pytest.fixture(
    scope="module",
    params=[
        Way(tls=False, direct=False),
        Way(tls=False, direct=True),
        Way(tls=True, direct=False),
    ],
    ids=["plain", "direct", "tls"],
)
def way(request: pytest.FixtureRequest) -> Way:
    """Every test runs each way (the module docstring)."""
    chosen: Way = request.param
    return chosen


def transport_of(conn: ServerSentEventConnection) -> type[SocketTransport]:
    transport = conn.writer.transport
    assert isinstance(transport, SocketTransport)
    return type(transport)


async def stalled(server: Server, handler: ServerSentEventHandler) -> tuple[socket.socket, Any]:
    """A client that never reads (its handler bounds the kernel's share: kernel_buffer).

    On a TLS server it completes the handshake and sends its request, then
    never reads (an ``ssl.SSLSocket``).
    """
    sock = await server.frozen_reader()
    await wait_until(lambda: len(handler) == 1)
    conn = handler.connections()[0]
    assert transport_of(conn) is (SocketTransport if server.tls is None else TLSTransport)
    return sock, conn


def fill_kernel_buffers(conn: ServerSentEventConnection) -> int:
    """Send big events until one has to wait in the queue; returns how many went."""
    n = 0
    while conn.queue_depth == 0:
        conn.send(data=BIG, id=str(n))
        n += 1
    return n


def read_all(sock: socket.socket, parser: EventStreamParser, timeout: float = 5.0) -> list[Any]:
    """Read a raw stream to its end: the events of its (chunked) body.

    ``sock`` may be an ``ssl.SSLSocket``: its ``recv`` gives the decrypted
    bytes, and ``b""`` at the end whether or not the server sent a TLS
    close_notify (``suppress_ragged_eofs``, the default).
    """
    if isinstance(sock, ssl.SSLSocket):
        assert sock.suppress_ragged_eofs
    sock.settimeout(timeout)
    received = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = Dechunker().feed(body)
    return parser.feed(body)


async def read_all_async(sock: socket.socket) -> list[Any]:
    """read_all in a thread, so the server's loop keeps writing meanwhile."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, read_all, sock, EventStreamParser())


async def test_order_is_kept_across_fast_and_slow_paths(way: Way) -> None:
    handler = ServerSentEventHandler(
        kernel_buffer=4096, max_queue_messages=100_000, max_queue_bytes=1 << 30
    )
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        conn = handler.connections()[0]
        # A burst far bigger than the socket buffers: most of it takes the
        # queue, and the I/O task batches it out as the client reads.
        for i in range(2000):
            conn.send(data=f"{i} " + "y" * (i % 700), id=str(i))
        assert conn.queue_depth > 0
        events = await client.events(2000, timeout=20)
        assert [e.id for e in events] == [str(i) for i in range(2000)]
        assert all(e.data.startswith(f"{i} ") for i, e in enumerate(events))
        await conn.flush()
        assert conn.queue_depth == 0
        assert conn.events_sent == 2000
        client.close()


async def test_flush_waits_until_the_socket_took_everything(way: Way) -> None:
    handler = ServerSentEventHandler(kernel_buffer=4096)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        fill_kernel_buffers(conn)
        flushing = asyncio.ensure_future(conn.flush())
        await asyncio.sleep(0.05)
        assert not flushing.done()
        parser = EventStreamParser()
        loop = asyncio.get_running_loop()
        reader = loop.run_in_executor(None, read_all, sock, parser)
        await asyncio.wait_for(flushing, 5)
        assert conn.queue_depth == 0
        conn.stop()
        events = await reader
        assert len(events) == conn.events_sent
        sock.close()


async def test_overflow_disconnect_closes_with_reason_overflow(way: Way) -> None:
    handler = ServerSentEventHandler(
        kernel_buffer=4096, connection_class=Closing, max_queue_messages=5
    )
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        sent = fill_kernel_buffers(conn)
        while conn.queue_depth < 5:
            conn.send(data=BIG)
        assert conn.is_active
        assert conn.queue_depth == 5
        conn.send(data="one too many")
        assert conn.close_reason == CloseReason.OVERFLOW
        assert conn.dropped == 6  # the one refused and the five queued
        assert Closing.reasons == [CloseReason.OVERFLOW]
        assert len(handler) == 0
        # The client gets whole events up to where its stream was cut.
        events = read_all(sock, EventStreamParser())
        assert len(events) <= sent
        sock.close()


async def test_overflow_drop_oldest_keeps_the_newest(way: Way) -> None:
    handler = ServerSentEventHandler(
        kernel_buffer=4096, max_queue_messages=3, overflow_policy=OverflowPolicy.DROP_OLDEST
    )
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        fill_kernel_buffers(conn)
        # A frame the socket took part of must still go out whole; over TLS a
        # refused write too (OpenSSL must be called again with the same bytes).
        assert conn.writer.pinned or not way.tls
        protected = 1 if conn.writer.pinned else 0
        for i in range(10):
            conn.send(data=f"q{i}", id=f"q{i}")
        assert conn.is_active
        assert conn.queue_depth == 3
        assert conn.dropped == 8
        # flush() settles although some frames were dropped, never written.
        flushing = asyncio.ensure_future(conn.flush())
        reading = asyncio.ensure_future(read_all_async(sock))
        await asyncio.wait_for(flushing, 5)
        conn.stop()
        events = await reading
        ids = [e.id for e in events if e.id.startswith("q")]
        assert ids == [f"q{i}" for i in range(7 + protected, 10)]
        sock.close()


async def test_overflow_drop_newest_keeps_the_oldest(way: Way) -> None:
    handler = ServerSentEventHandler(
        kernel_buffer=4096, max_queue_messages=3, overflow_policy=OverflowPolicy.DROP_NEWEST
    )
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        fill_kernel_buffers(conn)
        queued_before = conn.queue_depth
        for i in range(10):
            conn.send(data=f"q{i}", id=f"q{i}")
        assert conn.is_active
        assert conn.queue_depth == 3
        assert conn.dropped == 10 - (3 - queued_before)
        # flush() settles although some frames were dropped, never written.
        flushing = asyncio.ensure_future(conn.flush())
        reading = asyncio.ensure_future(read_all_async(sock))
        await asyncio.wait_for(flushing, 5)
        conn.stop()
        events = await reading
        ids = [e.id for e in events if e.id.startswith("q")]
        assert ids == [f"q{i}" for i in range(3 - queued_before)]
        sock.close()


async def test_queue_byte_bound(way: Way) -> None:
    handler = ServerSentEventHandler(
        kernel_buffer=4096, connection_class=Closing, max_queue_bytes=200_000
    )
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        fill_kernel_buffers(conn)
        conn.send(data=BIG)
        conn.send(data=BIG)
        assert conn.is_active
        assert conn.queued_bytes <= 200_000
        conn.send(data=BIG)
        assert conn.close_reason == CloseReason.OVERFLOW
        sock.close()


async def test_write_deadline_evicts_a_frozen_reader(way: Way) -> None:
    handler = ServerSentEventHandler(
        kernel_buffer=4096, connection_class=Closing, write_timeout=0.2
    )
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        fill_kernel_buffers(conn)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await asyncio.wait_for(conn.wait_closed(), 2) == CloseReason.SLOW
        assert 0.15 <= loop.time() - start < 1.0
        assert Closing.reasons == [CloseReason.SLOW]
        assert len(handler) == 0
        sock.close()


async def test_a_reader_that_keeps_up_is_not_evicted(way: Way) -> None:
    handler = ServerSentEventHandler(connection_class=Closing, write_timeout=0.2)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        conn = handler.connections()[0]
        reading = asyncio.ensure_future(client.events(20))
        for i in range(20):
            conn.send(data=BIG, id=str(i))
            await asyncio.sleep(0.02)
        events = await reading
        assert [e.id for e in events] == [str(i) for i in range(20)]
        assert conn.is_active
        client.close()


async def test_write_error_closes_once(way: Way) -> None:
    handler = ServerSentEventHandler(kernel_buffer=4096, connection_class=Closing)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        # The kernel keeps the read side open until we read; shut the
        # connection down hard so the next write fails with EPIPE/ECONNRESET.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        await wait_until(lambda: conn.close_reason is not None)
        assert conn.close_reason in (CloseReason.CLIENT_CLOSED, CloseReason.WRITE_ERROR)
        assert len(Closing.reasons) == 1


@pytest.mark.parametrize("leave", ["close", "abort", "raw-close"])
async def test_a_client_that_leaves_is_seen_as_client_closed(way: Way, leave: str) -> None:
    # close: a FIN (over TLS after a close_notify); abort: a RST; raw-close: a
    # raw client closing its socket, a FIN without close_notify over TLS.
    handler = ServerSentEventHandler(connection_class=Closing)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        if leave == "raw-close":
            sock, conn = await stalled(server, handler)
            sock.close()
        else:
            client = await server.stream()
            await wait_until(lambda: len(handler) == 1)
            conn = handler.connections()[0]
            assert transport_of(conn) is (TLSTransport if way.tls else SocketTransport)
            client.close() if leave == "close" else client.abort()
        assert await asyncio.wait_for(conn.wait_closed(), 2) == CloseReason.CLIENT_CLOSED
        assert Closing.reasons == [CloseReason.CLIENT_CLOSED]
        assert len(handler) == 0


async def test_stop_while_queue_is_full_delivers_queue_then_farewell(way: Way) -> None:
    handler = ServerSentEventHandler(kernel_buffer=4096, connection_class=Closing)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        sent = fill_kernel_buffers(conn)
        conn.stop(ServerSentEvent(event="close", data="bye"))
        assert not conn.is_active
        events = await read_all_async(sock)
        assert [e.id for e in events[:-1]] == [str(i) for i in range(sent)]
        assert (events[-1].event, events[-1].data) == ("close", "bye")
        assert Closing.reasons == [CloseReason.STOPPED]
        sock.close()


class Ticker(ServerSentEventConnection):
    """Pulls from an async generator instead of the queue."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.source = self.prices()
        self.ready: list[Sendable] = []

    async def prices(self) -> AsyncIterator[int]:
        for i in range(50):
            yield i
            await asyncio.sleep(0)

    def registered(self) -> None:
        self.send(event="welcome", data="hi")

    async def poll_data(self) -> Sendable | None:
        try:
            price = await anext(self.source)
        except StopAsyncIteration:
            return None
        # Batching: pretend the next two prices are already known.
        self.ready = [ServerSentEvent(data=f"{price}.{n}", event="batch") for n in (1, 2)]
        return ServerSentEvent(data=str(price), id=str(price))

    def poll_data_immediate(self) -> list[Sendable]:
        ready, self.ready = self.ready, []
        return ready


async def test_poll_data_override_feeds_the_stream(way: Way) -> None:
    handler = ServerSentEventHandler(kernel_buffer=4096, connection_class=Ticker)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        client = await server.stream()
        welcome = await client.next_event()
        assert welcome.event == "welcome"
        events = await client.wait_closed()
        ticks = [e for e in events if e.event == "message"]
        assert [e.data for e in ticks] == [str(i) for i in range(50)]
        batches = [e.data for e in events if e.event == "batch"]
        assert batches[:2] == ["0.1", "0.2"]
        assert len(batches) == 100
        await wait_until(lambda: len(handler) == 0)


async def test_poll_data_immediate_alone_joins_each_batch_of_the_io_task(way: Way) -> None:
    # Not called for a frame the socket takes at once; called by the I/O task
    # once for each batch it writes, its items after the batch's frames.
    class Extra(ServerSentEventConnection):
        calls = 0

        def poll_data_immediate(self) -> list[Sendable]:
            self.calls += 1
            return [ServerSentEvent(data=f"extra {self.calls}", event="extra")]

    handler = ServerSentEventHandler(kernel_buffer=4096, connection_class=Extra)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        sock, conn = await stalled(server, handler)
        conn.send(data="fast")
        assert conn.calls == 0
        fill_kernel_buffers(conn)
        conn.stop()
        events = await read_all_async(sock)
        sock.close()
    assert events[0].data == "fast"
    extras = [e.data for e in events if e.event == "extra"]
    assert conn.calls >= 1
    assert extras == [f"extra {n}" for n in range(1, conn.calls + 1)]
    assert events[-1].event == "extra"
    assert conn.events_sent == len(events)


async def test_poll_data_override_still_takes_send(way: Way) -> None:
    gate: asyncio.Queue[str] = asyncio.Queue()

    class Gated(ServerSentEventConnection):
        async def poll_data(self) -> Sendable | None:
            return ServerSentEvent(data=await gate.get(), event="source")

    handler = ServerSentEventHandler(kernel_buffer=4096, connection_class=Gated)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        handler.send_all(data="pushed")
        assert (await client.next_event()).data == "pushed"
        await gate.put("pulled")
        event = await client.next_event()
        assert (event.event, event.data) == ("source", "pulled")
        client.close()


async def test_poll_data_that_raises_closes_with_hook_error(way: Way) -> None:
    class Broken(Closing):
        async def poll_data(self) -> Sendable | None:
            raise RuntimeError("source broke")

    handler = ServerSentEventHandler(kernel_buffer=4096, connection_class=Broken)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        client = await server.stream()
        await client.wait_closed()
        await wait_until(lambda: Closing.reasons == [CloseReason.HOOK_ERROR])


async def test_send_encoded_goes_out_verbatim(way: Way) -> None:
    handler = ServerSentEventHandler(kernel_buffer=4096)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        frame = ServerSentEvent(data="pre", event="enc").encode()
        handler.connections()[0].send_encoded(frame)
        await client.wait_for_bytes(frame)
        assert client.raw.endswith(frame)
        client.close()


async def test_stats_count_events_and_bytes(way: Way) -> None:
    handler = ServerSentEventHandler(kernel_buffer=4096)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        conn = handler.connections()[0]
        head_bytes = conn.bytes_sent
        frame = ServerSentEvent(data="abc").encode()
        for _ in range(3):
            conn.send_encoded(frame)
        await conn.flush()
        stats = conn.stats()
        assert stats.events_sent == 3
        # Each frame went out as one HTTP/1.1 chunk.
        assert stats.bytes_sent == head_bytes + 3 * len(chunk(frame))
        assert stats.queue_depth == 0
        assert stats.dropped == 0
        assert stats.state == "live"
        await client.events(3)
        client.close()


async def test_a_stream_leaves_no_entry_in_tornados_handler_table(way: Way) -> None:
    # Its socket is watched through the asyncio loop itself: Tornado's
    # add_handler would keep a table entry, a set entry and an argument tuple
    # per stream (about 220 bytes of an idle one).
    handler = ServerSentEventHandler()
    io_loop = IOLoop.current()
    assert isinstance(io_loop, BaseAsyncIOLoop)
    async with serve(
        [handler.route("/events")], handler, tls=way.tls, direct=way.direct
    ) as server:
        before = len(io_loop.handlers)
        clients = [await server.stream() for _ in range(20)]
        await wait_until(lambda: len(handler) == 20)
        assert len(io_loop.handlers) <= before
        for client in clients:
            client.close()
        await wait_until(lambda: len(handler) == 0)
        assert len(io_loop.handlers) <= before
