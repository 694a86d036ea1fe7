"""Regression tests for the defects the connection core v2 removed (issue 10).

Each test provokes its defect over real localhost sockets and fails on the
core before the redesign (checked against 747894f):

1. TLS: a stream over ``HTTPServer(ssl_options=...)`` wrote plaintext into the
   TLS session.
2. ``await self.flush()`` in ``registered()`` hung when the socket did not take
   everything at once, and a client leaving meanwhile was never noticed.
3. ``conn.subscribe()`` racing a close left the closed connection subscribed.
4. A replay larger than the queue bound overflowed even a fast reader.
5. Frames of an overridden ``poll_data()`` skipped ``events_sent`` and
   ``max_event_size``; ``send_all()`` counted connections that dropped the frame.
6. ``max_connections_per_ip`` / ``max_connections`` were soft under an async
   ``authorize()``.
7. A client that left while an async ``authorize()`` ran reached no release hook.
8. A cancelled I/O task removed the writer of whatever socket reused its fd.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trustme
from support import serve, wait_until
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPServerRequest
from tornado.netutil import bind_sockets
from tornado.testing import bind_unused_port
from tornado.web import Application

from sse_handler import (
    CloseReason,
    MemoryBroker,
    OverflowPolicy,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
)
from sse_handler.connection import Sendable
from sse_handler.server import make_server
from sse_handler.testing import EventStreamClient, StreamEnded

BIG = "x" * 65536


def fill_kernel_buffers(conn: ServerSentEventConnection) -> None:
    """Send big events until one has to wait in the queue (the reader never reads)."""
    while conn.queue_depth == 0:
        conn.send(data=BIG)


# ----------------------------------------------------------------- 1. TLS


@asynccontextmanager
async def tls_server(handler: ServerSentEventHandler) -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    sock, port = bind_unused_port()
    server = HTTPServer(Application([handler.route("/events")]), ssl_options=server_context)
    server.add_sockets([sock])
    try:
        yield f"https://127.0.0.1:{port}/events", client_context
    finally:
        server.stop()
        await handler.shutdown(grace=0.2)
        await server.close_all_connections()


async def test_a_stream_over_tls_carries_events() -> None:
    handler = ServerSentEventHandler()
    async with tls_server(handler) as (url, context):
        client = await EventStreamClient.connect(url, ssl=context)
        assert client.status == 200
        await wait_until(lambda: len(handler) == 1)
        handler.send_all(data="secret")
        assert (await client.next_event()).data == "secret"
        client.close()
        await wait_until(lambda: len(handler) == 0)


# ----------------------------------------------- 2. flush() inside registered()


class Snapshot(ServerSentEventConnection):
    flushed: asyncio.Event

    async def registered(self) -> None:
        self.send(event="snapshot", data="s" * (8 << 20))
        await self.flush()
        Snapshot.flushed.set()
        self.send(event="done", data="")


async def test_flush_in_registered_completes_for_a_reader_of_an_8_mb_snapshot() -> None:
    Snapshot.flushed = asyncio.Event()
    handler = ServerSentEventHandler(connection_class=Snapshot)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        snapshot, done = await client.events(2, timeout=20)
        assert (len(snapshot.data), done.event) == (8 << 20, "done")
        assert Snapshot.flushed.is_set()
        client.close()


async def test_a_client_that_leaves_during_flush_in_registered_is_noticed() -> None:
    Snapshot.flushed = asyncio.Event()
    closed: list[CloseReason] = []

    class Watched(Snapshot):
        def connection_closed(self, reason: CloseReason) -> None:
            closed.append(reason)

    handler = ServerSentEventHandler(connection_class=Watched)
    async with serve([handler.route("/events")], handler) as server:
        sock = server.raw_socket()  # sends its request, never reads
        await wait_until(lambda: len(handler) == 1)
        sock.close()
        await wait_until(lambda: closed != [], timeout=5)
        assert closed == [CloseReason.CLIENT_CLOSED]
        assert not Snapshot.flushed.is_set()
        await wait_until(lambda: len(handler) == 0)


# ------------------------------------------- 3. subscribe() racing a close


async def test_subscribe_racing_a_close_leaves_nothing_subscribed() -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    class SlowBroker(MemoryBroker):
        async def subscribe(self, channel: str) -> None:
            if channel == "late":
                entered.set()
                await gate.wait()
            await super().subscribe(channel)

    class Late(ServerSentEventConnection):
        async def registered(self) -> None:
            await self.subscribe("late")

    broker = SlowBroker()
    handler = ServerSentEventHandler(connection_class=Late, broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await asyncio.wait_for(entered.wait(), 5)
        client.abort()
        await wait_until(lambda: len(handler) == 0)
        gate.set()
        await wait_until(lambda: "late" not in broker._subscribed)
        assert handler.subscribers("late") == []


# -------------------------------------------------------- 4. paced replay


async def test_a_replay_larger_than_the_queue_reaches_a_fast_reader_whole() -> None:
    broker = MemoryBroker(history_size=300)
    handler = ServerSentEventHandler(broker=broker)  # max_queue_bytes: 1 MiB
    async with serve([handler.route("/events")], handler) as server:
        first = await handler.publish("default", data="first")
        for i in range(256):  # 16 MiB after the cursor
            await handler.publish("default", event="bulk", data=f"{i:04}" + BIG[4:])
        client = await server.stream(headers={"Last-Event-ID": first})
        events = await client.events(256, timeout=30)
        assert [e.data[:4] for e in events] == [f"{i:04}" for i in range(256)]
        assert handler.stats().closed == {}
        client.close()


async def test_a_reader_too_slow_for_a_replay_is_closed_slow_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker(history_size=300)
    closed: list[CloseReason] = []

    class Handler(ServerSentEventHandler):
        def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
            assert conn.close_reason is not None
            closed.append(conn.close_reason)

    handler = Handler(broker=broker, write_timeout=0.3)
    async with serve([handler.route("/events")], handler) as server:
        first = await handler.publish("default", data="first")
        for i in range(256):
            await handler.publish("default", data=f"{i:04}" + BIG[4:])
        with caplog.at_level(logging.ERROR):
            sock = server.raw_socket(headers={"Last-Event-ID": first})
            await wait_until(lambda: closed != [], timeout=10)
        assert closed == [CloseReason.SLOW]
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        sock.close()


# --------------------------------------------------- 5. counting and sizes


async def test_frames_of_an_overridden_poll_data_are_counted_and_size_checked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Source(ServerSentEventConnection):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.items: list[Sendable] = [ServerSentEvent(data=str(i)) for i in range(3)]
            if self.query_arguments.get("big"):
                self.items.append(ServerSentEvent(data="z" * 2000))

        async def poll_data(self) -> Sendable | None:
            if self.items:
                return self.items.pop(0)
            await asyncio.Event().wait()  # then nothing more
            return None

    handler = ServerSentEventHandler(connection_class=Source, max_event_size=1000)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        assert [e.data for e in await client.events(3)] == ["0", "1", "2"]
        (conn,) = handler.connections()
        assert conn.events_sent == 3
        with caplog.at_level(logging.ERROR):
            big = await server.stream("/events?big=1")
            await big.events(3)
            with pytest.raises(StreamEnded):
                await big.next_event()
        assert "max_event_size" in caplog.text
        assert handler.stats().closed == {"hook_error": 1}
        client.close()


async def test_send_all_does_not_count_a_connection_that_dropped_the_frame() -> None:
    handler = ServerSentEventHandler(
        max_queue_messages=1, overflow_policy=OverflowPolicy.DROP_NEWEST
    )
    async with serve([handler.route("/events")], handler) as server:
        sock = server.raw_socket()
        await wait_until(lambda: len(handler) == 1)
        (conn,) = handler.connections()
        fill_kernel_buffers(conn)
        dropped = conn.dropped
        assert handler.send_all(data="one more") == 0
        assert conn.dropped == dropped + 1
        sock.close()


# ------------------------------------------------- 6. and 7. caps, releases


@asynccontextmanager
async def wide_server(handler: ServerSentEventHandler, direct: bool = False) -> AsyncIterator[int]:
    """A server whose listen backlog holds a crowd (no SYN retransmits); with
    ``direct``, make_server's (stream requests read by sse_handler.accept)."""
    sockets = bind_sockets(0, "127.0.0.1", backlog=2048)
    app = Application([handler.route("/events")])
    server = make_server(app, direct_accept=True) if direct else HTTPServer(app)
    server.add_sockets(sockets)
    try:
        yield sockets[0].getsockname()[1]
    finally:
        server.stop()
        await handler.shutdown(grace=0.2)
        await server.close_all_connections()


class SlowAuth(ServerSentEventHandler):
    peak = 0

    async def authorize(self, request: HTTPServerRequest) -> bool:
        await asyncio.sleep(0.2)
        return True

    def on_connection_registered(self, conn: ServerSentEventConnection) -> None:
        self.peak = max(self.peak, len(self))


async def crowd(port: int, n: int) -> list[EventStreamClient]:
    url = f"http://127.0.0.1:{port}/events"
    return list(
        await asyncio.gather(*(EventStreamClient.connect(url, timeout=20) for _ in range(n)))
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("settings", "n"),
    [({"max_connections_per_ip": 10}, 300), ({"max_connections": 10}, 1000)],
    ids=["per_ip", "total"],
)
@pytest.mark.parametrize("direct", [False, True], ids=["tornado", "direct"])
async def test_caps_hold_under_simultaneous_requests_with_an_async_authorize(
    settings: dict[str, int], n: int, direct: bool
) -> None:
    handler = SlowAuth(**settings)  # type: ignore[arg-type]
    async with wide_server(handler, direct) as port:
        clients = await crowd(port, n)
        # Every request is answered: 10 streams stay open, the rest are told
        # to come back later (200, a retry hint, the end of the stream).
        ends = await asyncio.gather(
            *(client.wait_closed(timeout=3) for client in clients), return_exceptions=True
        )
        still_open = sum(isinstance(end, TimeoutError) for end in ends)
        assert (still_open, len(handler), handler.counters.opened) == (10, 10, 10)
        assert handler.peak <= 10
        assert all(client.status == 200 for client in clients)
        for client in clients:
            client.close()


async def test_a_client_that_leaves_during_authorize_gets_exactly_one_release() -> None:
    active: dict[str, int] = {"user": 0}
    entered = asyncio.Event()
    released: list[str] = []

    class Counting(ServerSentEventHandler):
        async def authorize(self, request: HTTPServerRequest) -> bool:
            active["user"] += 1
            entered.set()
            await asyncio.sleep(0.3)
            return True

        def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
            active["user"] -= 1
            released.append(conn.cid)

    handler = Counting()
    async with serve([handler.route("/events")], handler) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        # The request comes after Tornado began waiting for it, so that it is
        # read on a readiness event and Tornado goes on watching the idle
        # socket: it then sees the client leave while authorize() runs.
        await asyncio.sleep(0.05)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(entered.wait(), 5)
        sock.close()
        await wait_until(lambda: active["user"] == 0, timeout=5)
        assert len(released) == 1
        assert len(handler) == 0
        assert handler.stats().closed == {"client_closed": 1}


# ------------------------------------------------------ 8. a reused fd


async def test_closing_a_blocked_stream_leaves_the_writer_of_a_reused_fd_alone() -> None:
    handler = ServerSentEventHandler(write_timeout=0)
    async with serve([handler.route("/events")], handler) as server:
        sock = server.raw_socket()
        await wait_until(lambda: len(handler) == 1)
        (conn,) = handler.connections()
        fill_kernel_buffers(conn)
        # The I/O task starts on the next turn of the loop, finds the socket
        # full and waits for writability.
        for _ in range(3):
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        await handler.shutdown(grace=0)
        # In the same turn of the loop, before the cancelled I/O task runs its
        # cleanup: new sockets take the lowest free fds, the stream's among
        # them, and wait for writability as another connection would.
        others = [end for _ in range(100) for end in socket.socketpair()]
        writable: set[int] = set()
        for other in others:
            other.setblocking(False)
            loop.add_writer(other.fileno(), writable.add, other.fileno())
        try:
            await wait_until(lambda: len(writable) == len(others), timeout=2)
        finally:
            for other in others:
                loop.remove_writer(other.fileno())
                other.close()
        sock.close()
