"""Registration: the head and what registered() sends at once leave in one write.

The sockets are real. To see how many ``send`` calls the connection made, the
accepted socket is re-wrapped in a ``socket.socket`` subclass that records
each call's bytes and then performs it: the kernel merges back-to-back
segments on loopback, so the client alone cannot tell one write from two.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection
from typing import Any

import pytest
from support import parse_head, read_to_eof, serve, wait_until
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPServerRequest
from tornado.testing import bind_unused_port
from tornado.web import Application

from sse_handler import (
    BrokerUnavailableError,
    CloseReason,
    MemoryBroker,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
)
from sse_handler.brokers import Replay
from sse_handler.testing import EventStreamClient
from sse_handler.transport import SocketTransport
from sse_handler.writer import Transport, chunk


class RecordingSocket:
    """Remembers what each ``send`` call on a real transport was given."""

    def __init__(self, transport: SocketTransport) -> None:
        self.sends: list[bytes] = []
        self._send = transport.send
        transport.send = self.send

    def send(self, data: bytes | memoryview) -> int:
        self.sends.append(bytes(data))
        return self._send(data)


class Recording(ServerSentEventHandler):
    sockets: list[RecordingSocket]

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.sockets = []

    def get_connection_impl(
        self,
        request: HTTPServerRequest,
        cid: str,
        transport: Transport,
        last_event_id: str | None,
    ) -> ServerSentEventConnection:
        assert isinstance(transport, SocketTransport)
        self.sockets.append(RecordingSocket(transport))
        return super().get_connection_impl(request, cid, transport, last_event_id)


class Welcome(ServerSentEventConnection):
    def registered(self) -> None:
        self.send(event="welcome", data=self.cid)
        self.send(event="rules", data="be nice")


async def test_head_and_welcome_leave_in_one_send() -> None:
    handler = Recording(connection_class=Welcome)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        welcome, rules = await client.events(2)
        assert (welcome.event, rules.event) == ("welcome", "rules")
        (sock,) = handler.sockets
        assert len(sock.sends) == 1
        first = sock.sends[0]
        assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        assert first.index(b": ok\n") < first.index(b"event: welcome\n")
        assert first.endswith(chunk(b"event: rules\ndata: be nice\n\n"))
        # After registration every send goes straight out again.
        handler.send_all(ServerSentEvent(data="live"))
        assert (await client.next_event()).data == "live"
        assert sock.sends[1] == chunk(b"data: live\n\n")
        client.close()


async def test_an_async_hook_does_not_hold_the_head_back() -> None:
    release = asyncio.Event()

    class Slow(ServerSentEventConnection):
        async def registered(self) -> None:
            await release.wait()
            self.send(event="welcome", data="late")

    handler = ServerSentEventHandler(connection_class=Slow)
    async with serve([handler.route("/events")], handler) as server:
        # connect() returns once the head is read: it must not need the hook.
        client = await server.stream()
        assert client.status == 200
        assert not release.is_set()
        release.set()
        assert (await client.next_event()).data == "late"
        client.close()


async def test_a_replay_from_memory_leaves_with_the_head_and_welcome_in_one_send() -> None:
    """A reconnect storm is a storm of replays: the head, the 50 events the
    client missed and the welcome must not take 52 system calls."""
    broker = MemoryBroker()
    handler = Recording(connection_class=Welcome, broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        first = await server.stream()
        await first.events(2)
        ids = [await handler.publish("default", ServerSentEvent(data=str(i))) for i in range(51)]
        await first.events(51)
        first.close()
        client = await server.stream(headers={"Last-Event-ID": ids[0]})
        events = await client.events(52)
        assert [e.data for e in events[:50]] == [str(i) for i in range(1, 51)]
        assert [e.event for e in events[50:]] == ["welcome", "rules"]
        sock = handler.sockets[1]
        assert len(sock.sends) == 1
        assert sock.sends[0].startswith(b"HTTP/1.1 200 OK\r\n")
        client.close()


async def test_an_async_hook_that_does_not_wait_keeps_the_head_and_its_events_together() -> None:
    class Quick(ServerSentEventConnection):
        async def registered(self) -> None:
            self.send(event="welcome", data=self.cid)

    handler = Recording(connection_class=Quick)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        assert (await client.next_event()).event == "welcome"
        (sock,) = handler.sockets
        assert len(sock.sends) == 1
        client.close()


async def test_a_large_snapshot_from_registered_is_not_bound_by_the_queue() -> None:
    """Frames behind the held head are as good as written: a snapshot larger
    than the queue bounds reaches the client whole and in order."""

    class Snapshot(ServerSentEventConnection):
        def registered(self) -> None:
            for i in range(2000):
                self.send(id=str(i), data="x" * 100)

    handler = Recording(connection_class=Snapshot, max_queue_messages=10, max_queue_bytes=4096)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        events = await client.events(2000, timeout=10)
        assert [e.id for e in events] == [str(i) for i in range(2000)]
        await wait_until(lambda: len(handler) == 1)
        (conn,) = handler.connections()
        assert conn.dropped == 0 and conn.close_reason is None
        # The head was held back with the first ~64 KiB, then written; the
        # rest went straight out.
        (sock,) = handler.sockets
        assert sock.sends[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert 64 * 1024 <= len(sock.sends[0]) < 65 * 1024
        assert len(sock.sends) > 1
        client.close()


async def test_flush_and_stop_inside_registered() -> None:
    flushed = asyncio.Event()

    class Brief(ServerSentEventConnection):
        async def registered(self) -> None:
            self.send(event="welcome", data="hi")
            await self.flush()  # must not wait on the held head forever
            flushed.set()
            self.stop(ServerSentEvent(event="bye", data=""))

    closed: list[CloseReason] = []

    class Handler(ServerSentEventHandler):
        def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
            assert conn.close_reason is not None
            closed.append(conn.close_reason)

    handler = Handler(connection_class=Brief)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        events = await client.wait_closed()
        assert [e.event for e in events] == ["welcome", "bye"]
        assert flushed.is_set()
        await wait_until(lambda: closed == [CloseReason.STOPPED])
        assert len(handler) == 0


async def test_a_hook_that_raises_still_sends_the_head() -> None:
    class Broken(ServerSentEventConnection):
        def registered(self) -> None:
            self.send(event="welcome", data="hi")
            raise RuntimeError("registered failed")

    handler = ServerSentEventHandler(connection_class=Broken)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        assert client.status == 200
        await client.wait_closed()
        await wait_until(lambda: len(handler) == 0)


@pytest.mark.parametrize(
    "error", [BrokerUnavailableError("down"), RuntimeError("a bug in the broker")]
)
async def test_a_failing_subscribe_turns_the_client_away_with_a_retry_hint(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(MemoryBroker):
        async def subscribe(self, channel: str) -> None:
            if channel == "broken":
                raise error
            await super().subscribe(channel)

    closed: list[CloseReason] = []

    class Handler(ServerSentEventHandler):
        def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
            assert conn.close_reason is not None
            closed.append(conn.close_reason)

    handler = Handler(broker=Failing())
    async with serve([handler.route("/events")], handler) as server:
        good = await server.stream("/events?channel=fine")
        with caplog.at_level(logging.WARNING, logger="sse_handler"):
            client = await server.stream("/events?channel=broken")
            assert client.status == 200
            await client.wait_closed()
        assert re.search(rb"^retry: \d+\n", bytes(client.raw), re.MULTILINE)
        if isinstance(error, BrokerUnavailableError):
            # An outage: one warning, no traceback.
            assert "the broker is unavailable (subscribing failed: down)" in caplog.text
            assert not [r for r in caplog.records if r.exc_info]
        else:
            assert "Could not subscribe" in caplog.text
        await wait_until(lambda: closed == [CloseReason.BROKER_ERROR])
        assert len(handler) == 1
        await handler.publish("fine", ServerSentEvent(data="still here"))
        assert (await good.next_event()).data == "still here"
        good.close()


async def test_a_replay_the_broker_cannot_read_turns_the_client_away_with_a_retry_hint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(MemoryBroker):
        async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
            raise BrokerUnavailableError("down")

    closed: list[CloseReason] = []
    registered: list[str] = []

    class Welcoming(ServerSentEventConnection):
        def registered(self) -> None:
            registered.append(self.cid)
            self.send(event="welcome", data="hi")

    class Handler(ServerSentEventHandler):
        def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
            assert conn.close_reason is not None
            closed.append(conn.close_reason)

    handler = Handler(broker=Failing(), connection_class=Welcoming)
    async with serve([handler.route("/events")], handler) as server:
        with caplog.at_level(logging.WARNING, logger="sse_handler"):
            client = await server.stream(headers={"Last-Event-ID": "1-0"})
            assert client.status == 200
            # No reset (nothing is known), no welcome: a retry hint and a close.
            assert await client.wait_closed() == []
        assert re.search(rb"^retry: \d+\n", bytes(client.raw), re.MULTILINE)
        assert "the broker is unavailable (a replay failed: down)" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        await wait_until(lambda: closed == [CloseReason.BROKER_ERROR])
        assert registered == []
        assert len(handler) == 0


async def test_a_registered_hook_that_never_returns_does_not_hold_up_the_server() -> None:
    """Registration runs apart from Tornado's connection: closing the server's
    connections does not wait for a hook, and the stream works meanwhile."""
    never = asyncio.Event()
    entered = asyncio.Event()

    class Waiting(ServerSentEventConnection):
        async def registered(self) -> None:
            entered.set()
            await never.wait()

    handler = ServerSentEventHandler(connection_class=Waiting)
    sock, port = bind_unused_port()
    server = HTTPServer(Application([handler.route("/events")]))
    server.add_sockets([sock])
    try:
        client = await EventStreamClient.connect(f"http://127.0.0.1:{port}/events")
        await asyncio.wait_for(entered.wait(), 5)
        handler.send_all(ServerSentEvent(data="while registering"))
        assert (await client.next_event()).data == "while registering"
    finally:
        server.stop()
        await handler.shutdown(grace=0.1)
        # Not wait_for(): cancelling it on timeout would cancel the hook and
        # let the close finish, which would hide the hang.
        closing = asyncio.ensure_future(server.close_all_connections())
        done, _ = await asyncio.wait({closing}, timeout=5)
        if not done:
            closing.cancel()
        assert closing in done, "close_all_connections() waited for the hook"
    assert len(handler) == 0
    await client.wait_closed()


class WaitingReplays(MemoryBroker):
    """A memory broker whose replays wait first, as a Redis read does."""

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        await asyncio.sleep(0.01)
        return await super().replay(channels, last_event_id)


async def test_a_replay_that_waits_sends_the_head_first_then_the_missed_events_in_one_send() -> (
    None
):
    handler = Recording(connection_class=Welcome, broker=WaitingReplays())
    async with serve([handler.route("/events")], handler) as server:
        first = await server.stream()
        await first.events(2)
        ids = [await handler.publish("default", ServerSentEvent(data=str(i))) for i in range(51)]
        await first.events(51)
        first.close()
        client = await server.stream(headers={"Last-Event-ID": ids[0]})
        events = await client.events(52)
        assert [e.data for e in events[:50]] == [str(i) for i in range(1, 51)]
        sends = handler.sockets[1].sends
        assert len(sends) == 4  # the head; the 50 missed events; welcome; rules
        assert sends[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert sends[1].count(b"data: ") == 50
        client.close()


class TimedReplays(MemoryBroker):
    """A memory broker whose reads run under ``asyncio.timeout``, as a
    network broker's do; it needs a task, which only a task can give."""

    async def subscribe(self, channel: str) -> None:
        async with asyncio.timeout(1):
            await super().subscribe(channel)

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        async with asyncio.timeout(1):
            return await super().replay(channels, last_event_id)


async def test_async_hooks_and_brokers_run_in_a_task(caplog: pytest.LogCaptureFixture) -> None:
    """Registration starts without a task (tasks.start_soon); an application's
    async hooks and a broker that has not said it needs none still get one,
    so asyncio.timeout works in them."""
    in_tasks: list[str] = []

    class Timed(ServerSentEventConnection):
        async def registered(self) -> None:
            async with asyncio.timeout(1):
                in_tasks.append("registered")
            self.send(event="welcome", data=self.cid)

    class Handler(ServerSentEventHandler):
        async def on_connection_registered(self, conn: ServerSentEventConnection) -> None:
            async with asyncio.timeout(1):
                in_tasks.append("on_connection_registered")

    class CustomReplay(ServerSentEventHandler):
        async def replay_events_since(self, conn: ServerSentEventConnection, last: str) -> None:
            async with asyncio.timeout(1):
                in_tasks.append("replay_events_since")

    broker = TimedReplays()
    handler = Handler(connection_class=Timed, broker=broker)
    custom = CustomReplay(connection_class=Timed)
    routes = [handler.route("/events"), custom.route("/custom")]
    with caplog.at_level(logging.ERROR, logger="sse_handler"):
        async with serve(routes, handler, custom) as server:
            first = await server.stream()
            assert (await first.next_event()).event == "welcome"
            event_id = await handler.publish("default", ServerSentEvent(data="missed"))
            resumed = await server.stream(headers={"Last-Event-ID": "0-0"})
            events = await resumed.events(2)
            assert [e.event for e in events] == ["reset", "welcome"]
            resumed.close()
            resumed = await server.stream(headers={"Last-Event-ID": event_id})
            assert (await resumed.next_event()).event == "welcome"
            other = await server.stream("/custom", headers={"Last-Event-ID": "7"})
            assert (await other.next_event()).event == "welcome"
            for client in (first, resumed, other):
                client.close()
    assert in_tasks.count("registered") == 4
    assert in_tasks.count("on_connection_registered") == 3
    assert in_tasks.count("replay_events_since") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_replay_hook_set_on_the_instance_runs_in_a_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the handler's own replay goes without a task: an async one set on
    the instance (not overridden in a subclass) gets one like any hook."""
    ran: list[str] = []
    handler = ServerSentEventHandler(connection_class=Welcome)

    async def replay(conn: ServerSentEventConnection, last_event_id: str) -> None:
        async with asyncio.timeout(1):
            ran.append(last_event_id)

    handler.replay_events_since = replay  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="sse_handler"):
        async with serve([handler.route("/events")], handler) as server:
            client = await server.stream(headers={"Last-Event-ID": "7"})
            assert (await client.next_event()).event == "welcome"
            client.close()
    assert ran == ["7"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_streams_registered_in_one_turn_each_get_their_head_whatever_the_others_do() -> None:
    """The streams registered in one turn of the loop write their first bytes
    once every registration of the turn is done (tasks.after_batch). A later
    registration's hook that stops or closes an earlier stream meanwhile
    still leaves that client a whole response: the head and its welcome
    first, then the farewell, or the end of the response."""
    registered: list[ServerSentEventConnection] = []
    states_then: list[str] = []

    class Handler(ServerSentEventHandler):
        def on_connection_registered(self, conn: ServerSentEventConnection) -> None:
            registered.append(conn)
            if len(registered) == 4:
                states_then.extend(c.state.name for c in registered[:2])
                registered[0].stop(ServerSentEvent(event="bye", data=""))
                registered[1].close(CloseReason.STOPPED)

    handler = Handler(connection_class=Welcome)
    async with serve([handler.route("/events")], handler, direct=True) as server:
        # Connected and sent before the server's loop runs: one turn takes all four.
        clients = [server.raw_socket() for _ in range(4)]
        try:
            await wait_until(lambda: len(registered) == 4)
            assert states_then == ["HELD", "HELD"]  # their heads not yet written
            answers = []
            for sock in clients[:2]:
                reader, writer = await asyncio.open_connection(sock=sock)
                answers.append(await read_to_eof(reader, 5.0))
                writer.close()
        finally:
            for sock in clients:
                sock.close()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert parse_head(head + b"\r\n")[0] == 200
        assert re.search(rb"event: welcome\r?\n", body)
    assert re.search(rb"event: welcome.*event: rules.*event: bye", answers[0], re.S)
    assert b"event: bye" not in answers[1]
