"""Disconnect and reconnect storms: 5,000 clients at once (issue 6).

Disconnect storm: an in-process server, 5,000 streams that all reset (RST) in
the same loop iteration. Every connection must leave the registry through
``_close`` exactly once, and the process must give back what the connections
held: descriptors, tasks and (near enough) memory. The same with 5,000
clients that reset while their request is being accepted, before the head.

Shutdown during a connect storm: every client, registered, half-way in or
arriving late, is told to come back (a ``retry:`` hint) and closed.

Reconnect storm: 5,000 streams on a real demo process that is stopped with
SIGTERM and started again on the same port. Each client comes back after the
``retry:`` hint of its own farewell, as an ``EventSource`` does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import random
import signal
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from support import DemoProcess, wait_until
from tornado.httputil import HTTPServerRequest
from tornado.netutil import bind_sockets
from tornado.web import Application

from sse_handler import CloseReason, ServerSentEventConnection, ServerSentEventHandler
from sse_handler.parser import EventStreamParser
from sse_handler.server import make_server
from sse_handler.testing import EventStreamClient, StreamEnded

N = 5_000
#: Clients opened concurrently: under the listen backlog, so no SYN is dropped.
BATCH = 500
BACKLOG = 2048

#: After the storm, descriptors and tasks may differ from the baseline by this
#: little: the loop's self-pipe and the like, never one per connection.
FD_TOLERANCE = 10
TASK_TOLERANCE = 2
#: RSS after a storm, compared with the RSS after a warm-up storm of the same
#: size. CPython keeps freed arenas and malloc keeps freed heap pages, so the
#: first 5,000 connections (both ends) grow the process for good: measured
#: 49 -> 107 MiB, ~12 KB per client and server pair. A second round must not
#: grow it further: measured +1.5-2 MiB, most of it this test's own counters
#: (3 x 5,000 more cids); six rounds in a row stayed within +-1 MiB. 10 MiB
#: fails a leak of 2 KB per connection.
RSS_TOLERANCE = 10 * 1024 * 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_count() -> int:
    return len(asyncio.all_tasks())


def rss() -> int:
    """Resident set size in bytes (VmRSS), after a full collection."""
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class StormHandler(ServerSentEventHandler):
    """Counts, per cid, how often each end-of-connection hook ran."""

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        self.closed_calls: collections.Counter[str] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()
        self.deregistered: collections.Counter[str] = collections.Counter()

    def on_connection_deregistered(self, conn: ServerSentEventConnection) -> None:
        self.deregistered[conn.cid] += 1


class CountingConnection(ServerSentEventConnection):
    def connection_closed(self, reason: CloseReason) -> None:
        handler = self.handler
        assert isinstance(handler, StormHandler)
        handler.closed_calls[self.cid] += 1
        handler.reasons[reason] += 1


@contextlib.asynccontextmanager
async def storm_server(handler: ServerSentEventHandler) -> AsyncIterator[str]:
    """``handler`` on 127.0.0.1 with a backlog for a storm; yields the stream's URL."""
    sockets = bind_sockets(0, "127.0.0.1", backlog=BACKLOG)
    server = make_server(Application([handler.route("/events")]))
    server.add_sockets(sockets)
    try:
        yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}/events"
    finally:
        server.stop()
        await handler.shutdown(grace=0.5)
        await server.close_all_connections()


async def open_clients(url: str, n: int) -> list[EventStreamClient]:
    clients: list[EventStreamClient] = []
    for start in range(0, n, BATCH):
        batch = min(BATCH, n - start)
        clients += await asyncio.gather(
            *(EventStreamClient.connect(url, timeout=30) for _ in range(batch))
        )
    return clients


async def turned_away(client: EventStreamClient) -> int | None:
    """If the answer is a finite "come back later" (a body with Content-Length,
    as Tornado sends the 200 + ``retry:`` of a client shed over a cap or during
    shutdown), its retry hint; ``None`` for a stream."""
    if "Content-Length" not in client.headers:
        return None
    parser = EventStreamParser()
    parser.feed(await client.read_body(timeout=10))
    assert parser.retry is not None, "turned away without a retry hint"
    return parser.retry


@dataclass
class StormRound:
    cids: set[str]
    rss_connected: int
    fds_connected: int
    tasks_connected: int
    drained_in: float


async def disconnect_storm(handler: StormHandler, url: str) -> StormRound:
    """Open N streams, reset all of them in one loop iteration, wait for the registry."""
    clients = await open_clients(url, N)
    assert {c.status for c in clients} == {200}
    await wait_until(lambda: len(handler) == N, timeout=30)
    cids = set(handler.connection_ids())
    connected = (rss(), open_fds(), task_count())
    loop = asyncio.get_running_loop()
    start = loop.time()
    for client in clients:
        client.abort()
    await wait_until(lambda: len(handler) == 0, timeout=30)
    drained_in = loop.time() - start
    del clients
    return StormRound(cids, *connected, drained_in)


@pytest.mark.timeout(90)
async def test_disconnect_storm_leaks_nothing(fd_limit: int) -> None:
    handler = StormHandler(connection_class=CountingConnection, keepalive=0)
    async with storm_server(handler) as url:
        before_warmup = (rss(), open_fds(), task_count())
        warmup = await disconnect_storm(handler, url)
        await wait_until(lambda: task_count() <= before_warmup[2] + TASK_TOLERANCE, 10)
        await wait_until(lambda: open_fds() <= before_warmup[1] + FD_TOLERANCE, 10)
        rss0, fds0, tasks0 = rss(), open_fds(), task_count()

        storm = await disconnect_storm(handler, url)

        # Tasks and descriptors go back by themselves, once the cancelled I/O
        # tasks have run and the aborted transports have closed their sockets.
        await wait_until(lambda: task_count() <= tasks0 + TASK_TOLERANCE, 10)
        await wait_until(lambda: open_fds() <= fds0 + FD_TOLERANCE, 10)
        rss1, fds1, tasks1 = rss(), open_fds(), task_count()
        print(
            f"\ndisconnect storm, N={N}: before warm-up rss={before_warmup[0] >> 20} MiB "
            f"fds={before_warmup[1]} tasks={before_warmup[2]}; warm-up peak "
            f"rss={warmup.rss_connected >> 20} MiB, drained in {warmup.drained_in:.2f} s\n"
            f"baseline rss={rss0 / 2**20:.1f} MiB fds={fds0} tasks={tasks0}; "
            f"connected rss={storm.rss_connected / 2**20:.1f} MiB fds={storm.fds_connected} "
            f"tasks={storm.tasks_connected}; drained in {storm.drained_in:.2f} s; "
            f"after rss={rss1 / 2**20:.1f} MiB ({(rss1 - rss0) / 2**20:+.1f}) fds={fds1} "
            f"tasks={tasks1}"
        )

        every = warmup.cids | storm.cids
        assert len(every) == 2 * N
        assert handler.stats().open == 0
        assert handler.subscribers(handler.default_channel) == []
        # Each hook ran exactly once for each connection, whatever the race.
        assert set(handler.closed_calls) == every
        assert set(handler.closed_calls.values()) == {1}
        assert set(handler.deregistered) == every
        assert set(handler.deregistered.values()) == {1}
        assert handler.reasons == {CloseReason.CLIENT_CLOSED: 2 * N}
        assert handler.stats().closed == {"client_closed": 2 * N}
        # While connected, each connection held a descriptor; no task (a
        # connection starts its I/O task only when a frame has to wait).
        assert storm.fds_connected >= fds0 + 2 * N  # both ends live in this process
        assert storm.tasks_connected <= tasks0 + TASK_TOLERANCE
        assert fds1 <= fds0 + FD_TOLERANCE
        assert tasks1 <= tasks0 + TASK_TOLERANCE
        assert abs(rss1 - rss0) <= RSS_TOLERANCE


#: What a client that resets mid-accept waits after sending its request: long
#: enough for the server to read the request, short enough to reset before
#: the response head is written. Measured: at 0-1 ms nearly every reset lands
#: in that window; any timing must leave the registry empty.
RESET_AFTER = 0.001


async def request_then_reset(url: str) -> None:
    """Send the request, and reset the connection before the answer (RST)."""
    parts = urlsplit(url)
    _reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"GET {parts.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await asyncio.sleep(random.uniform(0, RESET_AFTER))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


#: A per-address cap far above what is ever open at once in the reset storm
#: (each stream lives a millisecond), and far below N.
PER_IP_CAP = 1000


@pytest.mark.timeout(60)
async def test_resets_while_being_accepted_leave_no_ghosts(fd_limit: int) -> None:
    """5,000 clients reset between sending their request and reading the head.

    Whatever the server has done for each by then (nothing, or registered it
    and found the socket dead when the head went out), once every socket is
    closed the registry must be empty again, and the address must not be held
    over its cap by connections that no longer exist.
    """
    handler = StormHandler(
        connection_class=CountingConnection, keepalive=0, max_connections_per_ip=PER_IP_CAP
    )
    async with storm_server(handler) as url:
        fds0 = open_fds()
        for _ in range(0, N, BATCH):
            await asyncio.gather(*(request_then_reset(url) for _one in range(BATCH)))
        # Every server-side socket closed: nothing is being accepted any more.
        await wait_until(lambda: open_fds() <= fds0 + FD_TOLERANCE, timeout=20)
        # The last resets may not have been read yet (the fd count has a
        # tolerance): give the loop time to see them. A ghost never leaves the
        # registry, so it is still there after the wait, and reported below.
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: len(handler) == 0, timeout=5)
        snapshot = handler.stats()
        ghosts = collections.Counter(
            "active" if c.is_active else f"closed ({c.close_reason})"
            for c in handler.connections()
        )
        # A client from the same address, after the storm.
        later = await EventStreamClient.connect(url, timeout=10)
        try:
            later_hint = await turned_away(later)
            if later_hint is None:
                await later.wait_for_bytes(b": ok\n", timeout=5)
        finally:
            later.close()
        print(
            f"\nresets mid-accept, N={N}: opened {snapshot.opened}, closed {snapshot.closed}, "
            f"left in the registry {dict(ghosts)}; a new client turned away with retry "
            f"{later_hint}"
        )
        assert set(handler.closed_calls.values()) <= {1}
        assert set(handler.deregistered) == set(handler.closed_calls)
        assert set(handler.deregistered.values()) <= {1}
        # The bug this catches: a connection whose head could not be written
        # is closed, then entered into the registry anyway, for good.
        assert ghosts == {}, "closed connections left in the registry"
        assert snapshot.open == 0
        assert later_hint is None, "the address is held over its cap by closed connections"


class SlowAuthorization(StormHandler):
    """An ``authorize`` that looks the client up somewhere (50 ms).

    Counts the requests let in (``channels_for`` runs right after the
    shutting-down check), those inside ``authorize``, and the registrations.
    """

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        self.let_in = 0
        self.authorizing = 0
        self.registered = 0
        self.registered_after_shutdown = 0

    def channels_for(self, request: HTTPServerRequest, path_kwargs: dict[str, str]) -> list[str]:
        self.let_in += 1
        return super().channels_for(request, path_kwargs)

    async def authorize(self, request: HTTPServerRequest) -> bool:
        self.authorizing += 1
        try:
            await asyncio.sleep(0.05)
        finally:
            self.authorizing -= 1
        return True

    def on_connection_registered(self, conn: ServerSentEventConnection) -> None:
        self.registered += 1
        if self.shutting_down:
            self.registered_after_shutdown += 1


@dataclass
class Ending:
    """How the server ended one client's request."""

    status: int
    retry: int | None
    #: The server closed the connection (EOF) after its answer.
    closed: bool


async def until_closed(url: str) -> Ending:
    """Connect, read the answer, and wait (at most 5 s) for the server to close."""
    client = await EventStreamClient.connect(url, timeout=30)
    retry: int | None = None
    try:
        retry = await turned_away(client)
        await client.wait_closed(timeout=5)
        closed = True
    except TimeoutError:
        closed = False
    finally:
        client.close()
    return Ending(client.status, retry if retry is not None else client.parser.retry, closed)


#: Clients that arrive while the handler is shutting down.
LATE = 100


@pytest.mark.timeout(60)
async def test_shutdown_during_a_connect_storm_leaves_no_stream_open(fd_limit: int) -> None:
    """shutdown() while 1,000 clients are connecting, and 100 more arrive during it.

    Some are registered, some are between the request and the registry (in
    ``authorize``), some arrive once it is shutting down. Each must get a
    ``retry:`` hint and a close: the farewell of a registered stream, or the
    200 of one turned away (which says ``Connection: close``).
    """
    handler = SlowAuthorization(connection_class=CountingConnection, keepalive=0)
    async with storm_server(handler) as url:
        storm = [asyncio.ensure_future(until_closed(url)) for _ in range(1000)]
        await wait_until(lambda: len(handler) >= 100 and handler.authorizing >= 10, timeout=20)
        in_authorize = handler.authorizing
        in_flight = handler.let_in - handler.registered
        # These start connecting once shutdown() has begun.
        late = [asyncio.ensure_future(until_closed(url)) for _ in range(LATE)]
        await handler.shutdown(grace=1)
        endings = await asyncio.wait_for(asyncio.gather(*storm, *late), 30)
        hintless = [e for e in endings if e.retry is None]
        left_open = [e for e in endings if not e.closed]
        print(
            f"\nshutdown mid-storm: {in_flight} requests let in but not registered at "
            f"shutdown, {in_authorize} of them in authorize(); "
            f"{handler.registered_after_shutdown} streams registered after shutdown() began; "
            f"5 s later {len(hintless)} clients had no retry hint, {len(left_open)} "
            f"({sum(not e.closed for e in endings[-LATE:])} of the {LATE} late ones) were "
            f"still not closed by the server"
        )
        assert {e.status for e in endings} == {200}
        # The bug this catches: a request past the shutting-down check but not
        # yet registered when shutdown() runs is registered afterwards, gets no
        # farewell, and stays open after shutdown() has returned.
        assert handler.registered_after_shutdown == 0
        assert hintless == []
        assert len(handler) == 0
        # And this one: the 200 + retry of a client turned away says
        # "Connection: close", but Tornado keeps the connection alive.
        assert left_open == []


# --- reconnect storm ------------------------------------------------------------------------

#: The demo listens with Tornado's default backlog (128): open fewer at once.
DEMO_BATCH = 100
#: The demo's shutdown grace (sse_handler.demo.app.serve), and what the
#: interpreter may add to exit once the streams are closed.
DEMO_GRACE = 2.0
EXIT_MARGIN = 1.0
#: From SIGTERM until the last client is back, beyond the largest hint: the
#: old process closing and the new one starting (measured: 0.6-2.1 s), and
#: 5,000 handshakes, requests and welcomes through one Python client process.
#: The demo listens with a backlog of 128, so under load a few SYNs overflow
#: its accept queue and the kernel resends them after 1, 3, 7 s (measured: 0
#: to 3 dropped per run; once a client came back 6.9 s after its hint). Room
#: too for one more hint (<= 5 s) for a client that came back in the gap
#: between the two processes and found nothing listening.
BACK_MARGIN = 15.0
#: A client gives up after this many tries (each one waits its hint first).
MAX_TRIES = 5


@dataclass
class Reconnecting:
    """One client through the restart, as an EventSource goes through it."""

    client: EventStreamClient
    hint: int | None = None
    last_event_id: str = ""
    hint_at: float = 0.0
    back_at: float | None = None
    first_event_back: str = ""
    #: What each try met: "welcome", "shed" (200 + retry: + close),
    #: "tcp_refused" (nothing listening yet), or "status <code>".
    outcomes: list[str] = field(default_factory=list)
    shed_hints: list[int | None] = field(default_factory=list)


def listen_overflows() -> int:
    """The kernel's count of SYNs dropped because an accept queue was full."""
    with open("/proc/net/netstat") as netstat:
        names, values = [line.split() for line in netstat if line.startswith("TcpExt:")][:2]
    return int(values[names.index("ListenOverflows")])


def demo_on(port: int) -> DemoProcess:
    """A demo process on a given port (DemoProcess picks a free one)."""
    demo = DemoProcess()
    demo.port = port
    demo.url = f"http://127.0.0.1:{port}"
    demo.args = ["--port", str(port)]
    return demo


async def welcomed(url: str) -> Reconnecting:
    client = await EventStreamClient.connect(url, timeout=30)
    assert client.status == 200
    assert (await client.next_event(timeout=30)).event == "welcome"
    return Reconnecting(client)


async def come_back(one: Reconnecting, url: str) -> None:
    """Read to the farewell's close, then reconnect after the hint, as a browser does."""
    loop = asyncio.get_running_loop()
    events = await one.client.wait_closed(timeout=15)
    one.hint_at = loop.time()
    one.hint = one.client.parser.retry
    assert [e.event for e in events][-1:] == ["shutdown"], events
    assert one.hint is not None
    one.last_event_id = one.client.last_event_id
    headers = {"Last-Event-ID": one.last_event_id} if one.last_event_id else {}
    wait = one.hint
    for _ in range(MAX_TRIES):
        await asyncio.sleep(wait / 1000)
        try:
            client = await EventStreamClient.connect(url, headers, timeout=15)
        except OSError:
            # Nothing listening between the two processes: a browser treats it
            # as a network error and retries after its reconnection time.
            one.outcomes.append("tcp_refused")
            continue
        try:
            if client.status != 200:
                one.outcomes.append(f"status {client.status}")
                return
            shed = await turned_away(client)
            if shed is not None:
                one.outcomes.append("shed")
                one.shed_hints.append(shed)
                wait = shed
                continue
            try:
                first = await client.next_event(timeout=15)
                if first.event != "welcome":
                    one.first_event_back = first.event
                    first = await client.next_event(timeout=15)
            except StreamEnded:
                one.outcomes.append("shed")
                one.shed_hints.append(client.parser.retry)
                wait = client.parser.retry if client.parser.retry is not None else wait
                continue
            assert first.event == "welcome"
            one.outcomes.append("welcome")
            one.back_at = loop.time()
            one.client = client
            return
        finally:
            if one.client is not client:
                client.close()


@pytest.mark.timeout(120)
async def test_reconnect_storm_after_a_restart(fd_limit: int) -> None:
    first = await DemoProcess().start()
    second: DemoProcess | None = None
    url = first.url + "/events"
    clients: list[Reconnecting] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for _ in range(0, N, DEMO_BATCH):
            clients += await asyncio.gather(*(welcomed(url) for _one in range(DEMO_BATCH)))
        assert len(clients) == N
        connected_in = loop.time() - started
        # One published event, so that every client has a Last-Event-ID to send.
        code, answer = await first.publish("before the restart")
        assert (code, answer["delivered_to"]) == (200, N)
        published = await asyncio.gather(*(one.client.next_event(timeout=30) for one in clients))
        assert {e.data for e in published} == {"before the restart"}

        returning = [asyncio.ensure_future(come_back(one, url)) for one in clients]
        overflows = listen_overflows()
        assert first.proc is not None
        term_at = loop.time()
        first.proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(first.proc.wait(), DEMO_GRACE + EXIT_MARGIN)
        exited_in = loop.time() - term_at
        assert status == 0
        second = await demo_on(first.port).start()
        listening_in = loop.time() - term_at
        await asyncio.wait_for(asyncio.gather(*returning), 5 + BACK_MARGIN + 5 * MAX_TRIES)
        overflows = listen_overflows() - overflows

        hints = [one.hint for one in clients]
        assert all(h is not None for h in hints)
        spread = sorted({h for h in hints if h is not None})
        outcomes = collections.Counter(o for one in clients for o in one.outcomes)
        back = [one.back_at for one in clients]
        last_back = max(b for b in back if b is not None) if any(back) else float("nan")
        late = [o.back_at - o.hint_at - (o.hint or 0) / 1000 for o in clients if o.back_at] or [0]
        print(
            f"\nreconnect storm, N={N}: connected in {connected_in:.1f} s; old process "
            f"exited {exited_in:.2f} s after SIGTERM; new one listening at {listening_in:.2f} s; "
            f"hints {spread[0]}..{spread[-1]} ms, {len(spread)} distinct; last client back "
            f"{last_back - term_at:.2f} s after SIGTERM (the latest {max(late):.2f} s after "
            f"its own hint); SYNs dropped on full accept queues (whole host): {overflows}; "
            f"outcomes {dict(outcomes)}; "
            f"first events back {collections.Counter(o.first_event_back for o in clients)}"
        )
        assert exited_in <= DEMO_GRACE + EXIT_MARGIN
        # Jittered: the hints spread over the demo's reconnect_retry range.
        assert len(spread) >= 100
        assert spread[0] >= 1000 and spread[-1] <= 5000
        # Every client is back, and none met a refusal without a hint.
        assert all(one.back_at is not None for one in clients)
        assert outcomes["welcome"] == N
        assert not [o for o in outcomes if o.startswith("status")]
        assert all(h is not None for one in clients for h in one.shed_hints)
        assert last_back - term_at <= spread[-1] / 1000 + BACK_MARGIN
        # Each came back with its Last-Event-ID; the new process has no history
        # of the old one's events, so it says so (reset) before the welcome.
        assert {one.last_event_id for one in clients} == {published[0].id}
        assert {one.first_event_back for one in clients} == {"reset"}
    finally:
        for one in clients:
            one.client.close()
        for demo in (first, second):
            if demo is not None and demo.proc is not None:
                await demo.stop()
