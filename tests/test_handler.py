"""The handler over real sockets: head, registry, admin operations, hooks, auth."""

from __future__ import annotations

import asyncio
import email.utils
import re
import socket
import time
from typing import Any, ClassVar

import pytest
from support import serve, wait_until
from tornado.httpclient import AsyncHTTPClient
from tornado.httputil import HTTPServerRequest
from tornado.web import HTTPError

from sse_handler import (
    CloseReason,
    ConnectionClosedError,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
    UnknownConnectionError,
)
from sse_handler.testing import EventStreamClient
from sse_handler.transport import SocketTransport
from sse_handler.writer import Transport


class Recorder(ServerSentEventConnection):
    """Sends a welcome event and records how it ended."""

    closed: ClassVar[list[tuple[str, CloseReason]]] = []

    def registered(self) -> None:
        self.send(event="welcome", data={"connection_id": self.cid})

    def connection_closed(self, reason: CloseReason) -> None:
        Recorder.closed.append((self.cid, reason))


class RecordingHandler(ServerSentEventHandler):
    connection_class = Recorder

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.deregistered: list[str] = []
        self.registered_order: list[str] = []

    def on_connection_registered(self, conn: ServerSentEventConnection) -> None:
        self.registered_order.append(conn.cid)

    def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
        self.deregistered.append(conn.cid)


@pytest.fixture(autouse=True)
def _reset_recorder() -> None:
    Recorder.closed = []


async def test_response_head_and_first_comment() -> None:
    handler = ServerSentEventHandler(retry=2500)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        assert client.status == 200
        assert client.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert client.headers["Cache-Control"] == "no-cache"
        assert client.headers["X-Accel-Buffering"] == "no"
        assert "Content-Length" not in client.headers
        # HTTP/1.1: each frame is a chunk, so urllib3-based clients see it at once.
        assert client.headers["Transfer-Encoding"] == "chunked"
        assert client.headers.get("Connection") != "keep-alive"
        # The first comment arrives before any event is sent, as a line of its
        # own: no blank line, which some clients would dispatch as an event.
        await client.wait_for_bytes(b": ok\nretry: 2500\n\n", timeout=2)
        assert client.raw.startswith(b": ok\nretry: 2500\n\n")
        assert client.parser.retry == 2500
        client.close()


@pytest.mark.parametrize("direct", [False, True], ids=["tornado", "direct"])
async def test_each_stream_head_has_its_date_its_retry_and_its_applications_headers(
    direct: bool,
) -> None:
    """Heads without application headers are made once a second: each
    handler still gets its own retry, a stream with an application's header
    its own head, and every head today's Date."""

    class Tagged(ServerSentEventHandler):
        def response_headers(self, request: HTTPServerRequest) -> dict[str, str]:
            return {"X-Tag": request.query_arguments.get("tag", [b"none"])[0].decode()}

    plain, other, tagged = (
        ServerSentEventHandler(retry=1000),
        ServerSentEventHandler(retry=2000),
        Tagged(retry=1000),
    )
    routes = [plain.route("/plain"), other.route("/other"), tagged.route("/tagged")]
    async with serve(routes, plain, other, tagged, direct=direct) as server:
        for _ in range(2):
            clients = [
                await server.stream(path)
                for path in ("/plain", "/other", "/tagged?tag=a", "/tagged?tag=b", "/plain")
            ]
            retries = []
            for client in clients:
                await client.wait_for_bytes(b"\n\n", timeout=2)
                retries.append(client.parser.retry)
                date = email.utils.parsedate_to_datetime(client.headers["Date"]).timestamp()
                assert abs(date - time.time()) < 3
            assert retries == [1000, 2000, 1000, 1000, 1000]
            assert [c.headers.get("X-Tag") for c in clients] == [None, None, "a", "b", None]
            for client in clients:
                client.close()


async def test_welcome_on_registration_and_hooks_order() -> None:
    handler = RecordingHandler()
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        welcome = await client.next_event()
        assert welcome.event == "welcome"
        cid = handler.connection_ids()[0]
        assert welcome.data == f'{{"connection_id":"{cid}"}}'
        assert handler.registered_order == [cid]
        conn = handler.get_connection(cid)
        assert conn.path == "/events"
        assert conn.remote_ip == "127.0.0.1"
        # Once registered, a connection keeps only the kept_headers.
        assert "Accept" not in conn.headers
        assert "User-Agent" not in conn.headers
        assert cid.isascii() and len(cid) <= 16
        client.close()
        await wait_until(lambda: not handler.connection_ids())
        assert Recorder.closed == [(cid, CloseReason.CLIENT_CLOSED)]
        assert handler.deregistered == [cid]


@pytest.mark.parametrize("direct", [False, True], ids=["tornado", "direct"])
async def test_a_registered_connection_keeps_every_value_of_a_kept_header(direct: bool) -> None:
    handler = ServerSentEventHandler(kept_headers=("X-Tag", "Origin"))
    async with serve([handler.route("/events")], handler, direct=direct) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(
            b"GET /events HTTP/1.1\r\nHost: x\r\nX-Tag: a\r\nAccept: text/event-stream\r\n"
            b"x-tag: b\r\nOrigin: https://o.example\r\n\r\n"
        )
        await wait_until(lambda: len(handler) == 1)
        conn = handler.connections()[0]
        await wait_until(lambda: "Accept" not in conn.headers)
        assert conn.headers.get_list("X-Tag") == ["a", "b"]
        assert list(conn.headers.get_all()) == [
            ("X-Tag", "a"),
            ("X-Tag", "b"),
            ("Origin", "https://o.example"),
        ]
        sock.close()


async def test_send_one_send_all_and_encode_once() -> None:
    handler = RecordingHandler()
    async with serve([handler.route("/events")], handler) as server:
        a, b = await server.stream(), await server.stream()
        await a.next_event()
        await b.next_event()
        assert len(handler) == 2
        assert handler.send_all(data="to all", event="news", id="1") == 2
        for client in (a, b):
            event = await client.next_event()
            assert (event.event, event.data, event.id) == ("news", "to all", "1")
        cid_b = handler.connection_ids()[1]
        handler.send_one(cid_b, ServerSentEvent(data="just b"))
        assert (await b.next_event()).data == "just b"
        handler.send_all(data="both again")
        assert (await a.next_event()).data == "both again"
        with pytest.raises(UnknownConnectionError) as info:
            handler.send_one("nope", data="x")
        assert isinstance(info.value, KeyError)
        assert "nope" in str(info.value)
        with pytest.raises(ValueError, match="event"):
            handler.send_all(data="x", event="bad\nname")
        a.close()
        b.close()


async def test_stop_one_and_stop_all_send_farewell_then_close() -> None:
    handler = RecordingHandler()
    async with serve([handler.route("/events")], handler) as server:
        clients = [await server.stream() for _ in range(3)]
        for client in clients:
            await client.next_event()
        first = handler.connection_ids()[0]
        handler.stop_one(first, ServerSentEvent(event="close", data="bye"), retry=10000)
        events = await clients[0].wait_closed()
        assert [(e.event, e.data) for e in events] == [("close", "bye")]
        assert clients[0].parser.retry == 10000
        with pytest.raises(UnknownConnectionError):
            handler.stop_one(first)
        handler.stop_all(ServerSentEvent(event="close", data=""))
        for client in clients[1:]:
            events = await client.wait_closed()
            assert [e.event for e in events] == ["close"]
        await wait_until(lambda: len(Recorder.closed) == 3)
        assert {reason for _, reason in Recorder.closed} == {CloseReason.STOPPED}
        assert len(handler) == 0


async def test_send_after_close_raises_closed_error() -> None:
    handler = RecordingHandler()
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await client.next_event()
        conn = handler.connections()[0]
        conn.stop()
        assert not conn.is_active
        with pytest.raises(ConnectionClosedError):
            conn.send(data="late")
        with pytest.raises(ConnectionClosedError):
            await conn.flush()
        assert await conn.wait_closed() == CloseReason.STOPPED
        await client.wait_closed()


async def test_last_event_id_from_header_and_query() -> None:
    seen: list[tuple[str, str]] = []

    class Replaying(ServerSentEventHandler):
        def replay_events_since(self, conn: ServerSentEventConnection, last_event_id: str) -> None:
            seen.append((conn.cid, last_event_id))
            conn.send(data=f"after {last_event_id}")

    handler = Replaying()
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream(headers={"Last-Event-ID": "41"})
        assert (await client.next_event()).data == "after 41"
        assert handler.get_connection(seen[0][0]).last_event_id == "41"
        client2 = await server.stream("/events?last_event_id=7")
        assert (await client2.next_event()).data == "after 7"
        client3 = await server.stream()
        handler.send_all(data="live")
        assert (await client3.next_event()).data == "live"
        assert len(seen) == 2
        for c in (client, client2, client3):
            c.close()


async def test_authorize_deny_401_403_and_204() -> None:
    class Guarded(ServerSentEventHandler):
        async def authorize(self, request: HTTPServerRequest) -> bool | None:
            await asyncio.sleep(0)
            token = request.headers.get("Authorization")
            if token is None:
                raise HTTPError(401)
            if token == "Bearer gone":
                raise HTTPError(204)
            return token == "Bearer ok"

    handler = Guarded()
    async with serve([handler.route("/events")], handler) as server:
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer nope"}, 403),
            ({"Authorization": "Bearer gone"}, 204),
        ):
            client = await server.stream(headers=headers)
            assert client.status == status
            body = await client.read_body()
            assert b"data:" not in body
            if status == 204:
                assert body == b""
            client.close()
        assert len(handler) == 0
        ok = await server.stream(headers={"Authorization": "Bearer ok"})
        assert ok.status == 200
        await wait_until(lambda: len(handler) == 1)
        ok.close()


async def test_only_get_is_allowed() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        http = AsyncHTTPClient()
        response = await http.fetch(
            server.url + "/events", method="POST", body=b"x", raise_error=False
        )
        assert response.code == 405
        http.close()


async def test_hook_that_raises_closes_only_its_connection() -> None:
    class Flaky(ServerSentEventConnection):
        def registered(self) -> None:
            if self.query_arguments.get("boom"):
                raise RuntimeError("registered failed")
            self.send(data="fine")

    handler = ServerSentEventHandler(connection_class=Flaky)
    async with serve([handler.route("/events")], handler) as server:
        good = await server.stream()
        assert (await good.next_event()).data == "fine"
        bad = await server.stream("/events?boom=1")
        assert await bad.wait_closed() == []
        handler.send_all(data="still here")
        assert (await good.next_event()).data == "still here"
        assert len(handler) == 1
        good.close()


async def test_keepalive_only_to_idle_connections() -> None:
    handler = ServerSentEventHandler(keepalive=0.2)
    async with serve([handler.route("/events")], handler) as server:
        idle = await server.stream()
        busy = await server.stream()
        await wait_until(lambda: len(handler) == 2)
        busy_conn = [c for c in handler.connections()][1]
        loop = asyncio.get_running_loop()
        start = loop.time()
        # Keep one connection busy for 0.6 s while the other stays silent.
        while loop.time() - start < 0.6:
            busy_conn.send(data="tick")
            await asyncio.sleep(0.05)
        await idle.wait_for_bytes(b"\n:\n", timeout=1)
        assert idle.comments.count("") >= 1
        await busy.events(5)
        assert "" not in busy.comments  # only "ok", the first comment
        idle.close()
        busy.close()


async def test_keepalive_interval_timing() -> None:
    handler = ServerSentEventHandler(keepalive=0.1)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        loop = asyncio.get_running_loop()
        await client.wait_for_bytes(b": ok\n")
        start = loop.time()
        await client.wait_for_bytes(b"\n:\n", timeout=1)
        first = loop.time() - start
        # Idle for the interval at least, and at most 1.5 intervals plus slack.
        assert 0.09 <= first <= 0.5
        client.close()


async def test_keepalive_zero_is_off() -> None:
    handler = ServerSentEventHandler(keepalive=0)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await client.wait_for_bytes(b": ok\n")
        with pytest.raises(TimeoutError):
            await client.wait_for_bytes(b"\n:\n", timeout=0.3)
        client.close()


class SlicedSweep(ServerSentEventHandler):
    """Visits at most two connections per housekeeping callback."""

    _sweep_slice = 2


async def test_keepalive_sweep_walks_the_connections_in_slices_over_the_period() -> None:
    handler = SlicedSweep(keepalive=0.6)  # a period of 0.3 s
    loop = asyncio.get_running_loop()
    # Per callback: when it ran, and the connections it visited (a visit moves
    # the writer's count of quiet ticks: up by one, or to 0 with a comment).
    callbacks: list[tuple[float, set[str]]] = []
    tick = handler._housekeeping_tick

    def timed_tick() -> None:
        before = {c.cid: c.writer.quiet for c in handler.connections()}
        tick()
        after = {c.cid: c.writer.quiet for c in handler.connections()}
        callbacks.append((loop.time(), {cid for cid, q in before.items() if after[cid] != q}))

    handler._housekeeping_tick = timed_tick  # type: ignore[method-assign]
    async with serve([handler.route("/events")], handler) as server:
        clients = [await server.stream() for _ in range(5)]
        await wait_until(lambda: len(handler) == 5)
        since = loop.time()
        for client in clients:
            await client.wait_for_bytes(b"\n:\n", timeout=3)  # every one gets its keep-alive

        def rounds() -> list[tuple[float, set[str]]]:
            # From the first round that began after the fifth registration.
            later = [c for c in callbacks if c[0] > since]
            first = next((i + 1 for i, c in enumerate(later) if len(c[1]) == 1), len(later))
            return later[first : first + 6]

        await wait_until(lambda: len(rounds()) == 6)
        two = rounds()
        assert [len(visited) for _, visited in two] == [2, 2, 1, 2, 2, 1]
        cids = set(handler.connection_ids())
        assert two[0][1] | two[1][1] | two[2][1] == cids  # each once per round
        assert two[3][1] | two[4][1] | two[5][1] == cids
        # Slices a third of a period apart; a round begins a period after the last.
        assert 0.08 <= two[1][0] - two[0][0] <= 0.25
        assert 0.28 <= two[3][0] - two[0][0] <= 0.6
        for client in clients:
            client.close()


async def test_shutdown_sends_farewell_with_jittered_retry_and_closes() -> None:
    handler = RecordingHandler(reconnect_retry=(2000, 3000))
    async with serve([handler.route("/events")], handler) as server:
        clients = [await server.stream() for _ in range(5)]
        for client in clients:
            await client.next_event()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await handler.shutdown(grace=1.0)
        assert loop.time() - start < 1.0
        assert len(handler) == 0
        retries = set()
        for client in clients:
            events = await client.wait_closed()
            assert [e.event for e in events] == ["shutdown"]
            assert client.parser.retry is not None
            assert 2000 <= client.parser.retry <= 3000
            retries.add(client.parser.retry)
        assert len(retries) > 1  # jittered, not one value for all
        assert {r for _, r in Recorder.closed} == {CloseReason.SHUTDOWN}
        # A request during shutdown is told to come back later, not refused.
        late = await server.stream()
        assert late.status == 200
        await late.wait_closed()
        assert late.parser.retry is not None and 2000 <= late.parser.retry <= 3000
        late.close()


async def test_shutdown_grace_bounds_a_client_that_never_reads() -> None:
    handler = RecordingHandler(write_timeout=0, kernel_buffer=4096)
    async with serve([handler.route("/events")], handler) as server:
        sock = server.raw_socket()
        await wait_until(lambda: len(handler) == 1)
        conn = handler.connections()[0]
        while conn.queue_depth == 0:
            conn.send(data="x" * 65536)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await handler.shutdown(grace=0.3)
        assert 0.25 <= loop.time() - start < 1.0
        assert conn.close_reason == CloseReason.SHUTDOWN
        sock.close()


async def test_unknown_setting_is_refused() -> None:
    with pytest.raises(TypeError, match="keepalive_seconds"):
        ServerSentEventHandler(keepalive_seconds=3)
    with pytest.raises(ValueError):
        ServerSentEventHandler(overflow_policy="explode")


async def test_dead_peer_socket_options() -> None:
    handler = ServerSentEventHandler(dead_peer_timeout=9)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        transport = handler.connections()[0].writer.transport
        assert isinstance(transport, SocketTransport)
        sock = transport.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 128 * 1024
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 9000
        client.close()


async def test_client_reset_closes_once() -> None:
    handler = RecordingHandler()
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await client.next_event()
        cid = handler.connection_ids()[0]
        client.abort()
        await wait_until(lambda: len(handler) == 0)
        # Sending to everyone afterwards must not resurrect or re-close it.
        assert handler.send_all(data="nobody") == 0
        assert Recorder.closed == [(cid, CloseReason.CLIENT_CLOSED)]
        assert handler.deregistered == [cid]


async def test_event_client_helper_sees_non_stream_404() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        client = await EventStreamClient.connect(server.url + "/nothing")
        assert client.status == 404
        client.close()


async def test_failing_connection_factory_answers_500_and_keeps_others() -> None:
    class Picky(ServerSentEventHandler):
        def get_connection_impl(
            self,
            request: HTTPServerRequest,
            cid: str,
            transport: Transport,
            last_event_id: str | None,
        ) -> ServerSentEventConnection:
            if request.query_arguments.get("fail"):
                raise RuntimeError("factory failed")
            return super().get_connection_impl(request, cid, transport, last_event_id)

    handler = Picky()
    async with serve([handler.route("/events")], handler) as server:
        good = await server.stream()
        await wait_until(lambda: len(handler) == 1)
        bad = await server.stream("/events?fail=1")
        assert bad.status == 500
        assert await bad.read_body() == b""
        handler.send_all(data="ok")
        assert (await good.next_event()).data == "ok"
        good.close()
        bad.close()


def test_cid_is_a_random_prefix_per_handler_then_a_counter() -> None:
    # docs/seed-apis.md: 9 or more URL-safe ASCII characters, unique within the handler.
    handler = ServerSentEventHandler()
    cids = [handler.new_cid() for _ in range(63)]
    assert len(set(cids)) == len(cids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{9,}", cid) for cid in cids)
    assert {cid[:8] for cid in cids} == {cids[0][:8]}
    assert (len(cids[0]), len(cids[-1])) == (9, 10)  # the counter is base 62
    assert ServerSentEventHandler().new_cid()[:8] != cids[0][:8]
