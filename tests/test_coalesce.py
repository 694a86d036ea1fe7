"""The coalescing window (``coalesce_window``) over real sockets.

Every send of a stream's socket is counted: :class:`Counting` wraps the
transport's ``send`` before the connection (and its writer, which binds it)
is built. Events are sent synchronously (``send_all``), so that they fall in
one window whatever the machine's load; the windows that must not end during
a test are long (30 s) and the test ends them itself, by ``flush()``,
``stop()``, ``shutdown()`` or ``end_window()``. The branches of the write
path are in tests/test_writer.py, over a scripted transport.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from support import serve, wait_until
from tornado.httputil import HTTPServerRequest

from sse_handler import (
    CloseReason,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
    State,
)
from sse_handler.testing import EventStreamClient
from sse_handler.transport import SocketTransport
from sse_handler.writer import CoalescingWriter, FrameWriter, Transport

LONG = 30.0  # a window no test waits for


class Counting(ServerSentEventHandler):
    """Records what each stream's socket took, one entry per ``send``."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.sends: dict[str, list[int]] = {}

    def get_connection_impl(
        self,
        request: HTTPServerRequest,
        cid: str,
        transport: Transport,
        last_event_id: str | None,
    ) -> ServerSentEventConnection:
        assert isinstance(transport, SocketTransport)
        sends = self.sends[cid] = []
        real = transport.send

        def send(data: bytes | memoryview, /) -> int:
            taken = real(data)
            sends.append(taken)
            return taken

        transport.send = send
        return super().get_connection_impl(request, cid, transport, last_event_id)


async def live_stream(
    server: Any, handler: Counting, path: str = "/events"
) -> tuple[EventStreamClient, ServerSentEventConnection, list[int]]:
    """A client, its connection once LIVE, and the sends of its socket so far."""
    client = await server.stream(path)
    await wait_until(lambda: len(handler) == 1)
    conn = handler.connections()[0]
    await wait_until(lambda: conn.state is State.LIVE)
    return client, conn, handler.sends[conn.cid]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_events_within_the_window_arrive_complete_in_order_in_one_send(tls: bool) -> None:
    handler = Counting(coalesce_window=0.05)
    async with serve([handler.route("/events")], handler, tls=tls) as server:
        client, conn, sends = await live_stream(server, handler)
        assert isinstance(conn.writer, CoalescingWriter)
        before = len(sends)
        for i in range(20):
            assert handler.send_all(data=f"{i} " + "z" * i, id=str(i)) == 1
        assert conn.writer.coalescing and len(sends) == before
        events = await client.events(20)
        assert [e.id for e in events] == [str(i) for i in range(20)]
        assert [e.data for e in events] == [f"{i} " + "z" * i for i in range(20)]
        assert len(sends) == before + 1
        assert sends[-1] == conn.bytes_sent - sum(sends[:before])
        assert conn.events_sent == 20 and handler.stats().events_sent == 20
        assert conn.queue_depth == 0 and not conn.writer.pending
        client.close()


async def test_without_a_window_each_event_is_its_own_send_at_once() -> None:
    handler = Counting()
    assert handler.coalescer is None
    async with serve([handler.route("/events")], handler) as server:
        client, conn, sends = await live_stream(server, handler)
        assert type(conn.writer) is FrameWriter
        before = len(sends)
        for i in range(5):
            handler.send_all(data=str(i))
            assert len(sends) == before + i + 1  # written before send_all returned
        events = await client.events(5)
        assert [e.data for e in events] == [str(i) for i in range(5)]
        client.close()


async def test_published_events_keep_their_order_across_windows() -> None:
    handler = Counting(coalesce_window=0.005)
    async with serve([handler.route("/events")], handler) as server:
        client, _, _ = await live_stream(server, handler)
        ids = []
        for i in range(50):
            ids.append(await handler.publish("default", data=str(i)))
            if i % 7 == 0:
                await asyncio.sleep(0)  # some windows end between publishes
        events = await client.events(50)
        assert [e.id for e in events] == ids
        assert [e.data for e in events] == [str(i) for i in range(50)]
        client.close()


async def test_flush_writes_the_coalesced_events_without_waiting_for_the_window() -> None:
    handler = Counting(coalesce_window=LONG)
    async with serve([handler.route("/events")], handler) as server:
        client, conn, sends = await live_stream(server, handler)
        before = len(sends)
        conn.send(data="a")
        conn.send(data="b")
        await asyncio.wait_for(conn.flush(), 2)
        assert len(sends) == before + 1
        assert [e.data for e in await client.events(2, timeout=2)] == ["a", "b"]
        client.close()


async def test_stop_sends_the_coalesced_events_and_the_farewell_before_closing() -> None:
    handler = Counting(coalesce_window=LONG)
    async with serve([handler.route("/events")], handler) as server:
        client, conn, sends = await live_stream(server, handler)
        before = len(sends)
        for i in range(3):
            handler.send_all(data=str(i))
        conn.stop(ServerSentEvent(event="bye", data=""))
        events = await client.wait_closed(timeout=2)
        assert [(e.event, e.data) for e in events] == [
            ("message", "0"),
            ("message", "1"),
            ("message", "2"),
            ("bye", ""),
        ]
        assert await asyncio.wait_for(conn.wait_closed(), 2) is CloseReason.STOPPED
        # The events with the farewell, then the last chunk.
        assert len(sends) == before + 2


async def test_shutdown_sends_what_waits_for_the_window_and_ends_it() -> None:
    handler = Counting(coalesce_window=LONG)
    async with serve([handler.route("/events")], handler) as server:
        client, _, _ = await live_stream(server, handler)
        for i in range(3):
            handler.send_all(data=str(i))
        coalescer = handler.coalescer
        assert coalescer is not None and coalescer.armed
        closing = asyncio.ensure_future(client.wait_closed(timeout=5))
        await handler.shutdown(grace=2)
        assert not coalescer.armed and coalescer.waiting == 0
        events = await closing
        assert [e.data for e in events[:3]] == ["0", "1", "2"]
        assert events[3].event == "shutdown"


async def test_a_client_that_left_while_coalescing_is_not_written() -> None:
    handler = Counting(coalesce_window=LONG)
    async with serve([handler.route("/events")], handler) as server:
        client, conn, sends = await live_stream(server, handler)
        handler.send_all(data="lost")
        assert conn.writer.coalescing
        client.close()
        assert await asyncio.wait_for(conn.wait_closed(), 5) is CloseReason.CLIENT_CLOSED
        before = len(sends)
        coalescer = handler.coalescer
        assert coalescer is not None
        coalescer.end_window()  # no error, and no send on the closed socket
        assert len(sends) == before
        assert conn.events_sent == 1 and not conn.writer.pending
        await wait_until(lambda: len(handler) == 0)


async def test_replay_then_live_events_through_the_window() -> None:
    handler = Counting(coalesce_window=0.01)
    async with serve([handler.route("/events")], handler) as server:
        ids = [await handler.publish("c", data=str(i)) for i in range(5)]
        client = await server.stream("/events?channel=c", {"Last-Event-ID": ids[1]})
        await wait_until(lambda: len(handler) == 1)
        live = await handler.publish("c", data="live")
        events = await client.events(4)
        assert [e.id for e in events] == [*ids[2:], live]
        assert [e.data for e in events] == ["2", "3", "4", "live"]
        client.close()


async def test_keepalives_still_reach_a_coalescing_stream() -> None:
    handler = Counting(coalesce_window=0.01, keepalive=0.1)
    async with serve([handler.route("/events")], handler) as server:
        client, _, _ = await live_stream(server, handler)
        await client.wait_for_bytes(b"\n:\n", timeout=5)
        handler.send_all(data="after")
        assert (await client.next_event()).data == "after"
        client.close()


# --- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.001, -1, math.inf, -math.inf, math.nan])
def test_a_negative_or_non_finite_window_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="coalesce_window"):
        ServerSentEventHandler(coalesce_window=bad)


@pytest.mark.parametrize("bad", ["0.01", True, None])
def test_a_window_that_is_not_a_number_is_refused(bad: Any) -> None:
    with pytest.raises(TypeError, match="coalesce_window"):
        ServerSentEventHandler(coalesce_window=bad)


def test_a_subclass_window_is_checked_when_the_handler_is_built() -> None:
    class Bad(ServerSentEventHandler):
        coalesce_window = -0.5

    with pytest.raises(ValueError, match="coalesce_window"):
        Bad()


def test_the_window_is_off_by_default_and_may_be_set_later() -> None:
    handler = ServerSentEventHandler()
    assert handler.coalesce_window == 0.0
    assert handler.coalescer is None
    handler.coalesce_window = 0.004
    coalescer = handler.coalescer
    assert coalescer is not None and coalescer.window == 0.004
    with pytest.raises(ValueError, match="coalesce_window"):
        handler.coalesce_window = math.nan
    assert handler.coalesce_window == 0.004
    handler.coalesce_window = 0
    assert handler.coalescer is None


def test_a_whole_number_of_seconds_is_a_window() -> None:
    handler = ServerSentEventHandler(coalesce_window=1)
    assert handler.coalesce_window == 1.0
    assert handler.coalescer is not None
