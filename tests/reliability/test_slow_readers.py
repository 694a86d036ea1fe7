"""Frozen readers next to normal ones under a steady publish rate (issue 6).

100 clients send their request and never read again; 1,000 clients read
normally. Events of ~1 KiB are published to all at 50 a second for 3 s.

* With the defaults (``disconnect`` policy) and ``write_timeout=0.5``: each
  frozen client is evicted with reason ``slow`` within the write deadline of
  the moment its socket stopped taking bytes. The queue bound (256 KiB) is
  larger than everything published (150 KiB), so the deadline, not the
  ``overflow`` policy, is what ends them.
* With ``drop_oldest`` and no deadline: the frozen clients stay connected and
  their queues stay within ``max_queue_bytes``, the oldest frames dropped.

In both, no normal client is closed and each receives every event, in order.
The normal readers run in a child process: 1,000 Python readers that fall
behind buffer what they have not parsed yet (measured: +130 MB), which would
drown the server's own memory in this process's RSS.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import Server, serve, wait_until

from sse_handler import (
    CloseReason,
    OverflowPolicy,
    ServerSentEventConnection,
    ServerSentEventHandler,
)
from sse_handler.metrics import register_metrics

FROZEN = 100
NORMAL = 1_000
RATE = 50  # events per second
EVENTS = 150  # 3 s at RATE
PAYLOAD = "x" * 1000  # a frame of ~1 KiB
#: Clients opened at once: under the listen backlog of serve() (128).
BATCH = 100
#: The frozen clients' receive buffer: small, so that it is the server's
#: queue and the deadline that hold the backlog.
SOCKET_BUFFER = 4096
#: The handler's bound on unsent bytes in the kernel per stream (its
#: kernel_buffer setting; the server's sockets are never touched by the test).
KERNEL_BUFFER = 16 * 1024
#: Evicted within write_timeout of getting stuck, plus this much: the loop
#: also serves 1,100 connections and the publisher, and the deadline timer
#: fires on its next turn. Measured: 0.501-0.521 s for a 0.5 s deadline
#: (0.57 s with the readers in this process too).
EVICTION_MARGIN = 0.5
#: RSS growth allowed beyond what the queues may hold (frozen x max_queue_bytes):
#: allocator slack and what the loop allocates while it serves 1,100 sockets.
#: Measured growth: under 1 MB, since the queues share each event's one encoded
#: frame; a copy per connection and event would grow it by ~165 MB.
RSS_MARGIN = 16 * 1024 * 1024


def rss() -> int:
    """Resident set size in bytes (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class TimedConnection(ServerSentEventConnection):
    def connection_closed(self, reason: CloseReason) -> None:
        handler = self.handler
        assert isinstance(handler, TimedHandler)
        handler.closed[self.cid] = (reason, asyncio.get_running_loop().time())


class TimedHandler(ServerSentEventHandler):
    """Records when, and why, each connection closed."""

    connection_class = TimedConnection

    def __init__(self, **settings: object) -> None:
        super().__init__(keepalive=0, **settings)
        self.closed: dict[str, tuple[CloseReason, float]] = {}


#: The normal readers, in a process of their own: what they buffer while they
#: catch up must not count as the server's memory. Each prints how many events
#: it read in order (or what went wrong), then they wait for stdin to close.
READERS = """
import asyncio, json, sys
from sse_handler.testing import EventStreamClient

async def main(url, n, events, payload, batch):
    clients = []
    for _ in range(0, n, batch):
        clients += await asyncio.gather(
            *(EventStreamClient.connect(url, timeout=30) for _ in range(batch))
        )
    print("connected", sum(c.status == 200 for c in clients), flush=True)

    async def read(client):
        got = 0
        try:
            for i in range(events):
                event = await client.next_event(timeout=30)
                if (event.event, event.id, len(event.data)) != ("tick", str(i), payload):
                    return f"event {i}: got {event.event!r} id {event.id!r}"
                got += 1
                client.raw.clear()
        except Exception as exc:
            return f"{type(exc).__name__} after {got} events"
        return got

    print(json.dumps(await asyncio.gather(*(read(c) for c in clients))), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for client in clients:
        client.close()

asyncio.run(main(sys.argv[1], *map(int, sys.argv[2:])))
"""


@dataclass
class Run:
    normal: list[ServerSentEventConnection]
    frozen: list[ServerSentEventConnection]
    #: When each frozen connection first had to queue (its socket was full).
    stuck_at: dict[str, float] = field(default_factory=dict)
    rss_before: int = 0
    rss_peak: int = 0
    #: The largest queue of a frozen connection seen after any publish.
    max_frozen_queue: int = 0
    #: Sum of the frozen connections' drop counts after each publish.
    dropped: list[int] = field(default_factory=list)
    #: Per normal client: how many events it read in order, or what went wrong.
    received: list[int | str] = field(default_factory=list)


async def start_readers(server: Server) -> asyncio.subprocess.Process:
    readers = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        READERS,
        server.url + "/events",
        *map(str, (NORMAL, EVENTS, len(PAYLOAD), BATCH)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert readers.stdout is not None
    line = await asyncio.wait_for(readers.stdout.readline(), 60)
    assert line.split() == [b"connected", str(NORMAL).encode()], line
    return readers


def open_frozen(server: Server) -> list[socket.socket]:
    """Clients that send their request and then never read."""
    return [server.raw_socket(rcvbuf=SOCKET_BUFFER) for _ in range(FROZEN)]


async def publish_to_frozen_and_normal(
    handler: TimedHandler, check: Callable[[Run], Awaitable[None]]
) -> None:
    """Open the clients, publish at RATE, then hand the run to ``check``."""
    async with serve([handler.route("/events")], handler) as server:
        readers: asyncio.subprocess.Process | None = None
        frozen_socks: list[socket.socket] = []
        try:
            readers = await start_readers(server)
            await wait_until(lambda: len(handler) == NORMAL, timeout=30)
            normal = handler.connections()
            frozen_socks = open_frozen(server)
            await wait_until(lambda: len(handler) == NORMAL + FROZEN, timeout=30)
            normal_cids = {c.cid for c in normal}
            frozen = [c for c in handler.connections() if c.cid not in normal_cids]
            run = Run(normal, frozen)
            gc.collect()
            run.rss_before = run.rss_peak = rss()
            await publish(handler, run)
            assert readers.stdout is not None
            run.received = json.loads(await asyncio.wait_for(readers.stdout.readline(), 30))
            run.rss_peak = max(run.rss_peak, rss())
            await check(run)
        finally:
            if readers is not None:
                if readers.returncode is None and readers.stdin is not None:
                    readers.stdin.close()
                try:
                    await asyncio.wait_for(readers.wait(), 10)
                except TimeoutError:
                    readers.kill()
                    await readers.wait()
            for sock in frozen_socks:
                sock.close()


async def publish(handler: TimedHandler, run: Run) -> None:
    """EVENTS events at RATE a second, on a fixed schedule (no drift)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(EVENTS):
        delivered = handler.send_all(event="tick", id=str(i), data=PAYLOAD)
        assert delivered >= NORMAL
        now = loop.time()
        for conn in run.frozen:
            # Right after a send, a connection whose socket is full has the
            # frame (or its unsent rest) in its queue.
            if conn.is_active and conn.queue_depth and conn.cid not in run.stuck_at:
                run.stuck_at[conn.cid] = now
            run.max_frozen_queue = max(run.max_frozen_queue, conn.queued_bytes)
        run.dropped.append(sum(conn.dropped for conn in run.frozen))
        if i % 10 == 0:
            run.rss_peak = max(run.rss_peak, rss())
        await asyncio.sleep(max(0.0, start + (i + 1) / RATE - loop.time()))


def counter_by(registry: CollectorRegistry, name: str, label: str) -> dict[str, float]:
    """A labelled counter's samples, parsed from the exposition text."""
    text = generate_latest(registry).decode()
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def assert_normal_clients_unharmed(handler: TimedHandler, run: Run) -> None:
    assert run.received == [EVENTS] * NORMAL
    assert all(conn.is_active for conn in run.normal)
    assert not {c.cid for c in run.normal} & set(handler.closed)


@pytest.mark.timeout(90)
async def test_frozen_readers_are_evicted_as_slow(fd_limit: int) -> None:
    handler = TimedHandler(
        write_timeout=0.5, max_queue_bytes=256 * 1024, kernel_buffer=KERNEL_BUFFER
    )
    registry = CollectorRegistry()
    register_metrics(handler, "events", registry)
    assert EVENTS * len(PAYLOAD) < handler.max_queue_bytes  # the deadline ends them

    async def check(run: Run) -> None:
        frozen_cids = {c.cid for c in run.frozen}
        await wait_until(lambda: frozen_cids <= set(handler.closed), timeout=5)
        evicted_after = sorted(handler.closed[cid][1] - run.stuck_at[cid] for cid in frozen_cids)
        growth = run.rss_peak - run.rss_before
        print(
            f"\nfrozen readers: {len(run.stuck_at)} stuck; evicted {evicted_after[0]:.3f}-"
            f"{evicted_after[-1]:.3f} s after getting stuck (median "
            f"{evicted_after[len(evicted_after) // 2]:.3f}); RSS before "
            f"{run.rss_before / 2**20:.1f} MiB, peak growth {growth / 2**20:+.1f} MiB; "
            f"largest frozen queue {run.max_frozen_queue} B; closed {handler.stats().closed}"
        )
        assert set(run.stuck_at) == frozen_cids
        assert {handler.closed[cid][0] for cid in frozen_cids} == {CloseReason.SLOW}
        assert all(
            handler.write_timeout - 0.05 <= t <= handler.write_timeout + EVICTION_MARGIN
            for t in evicted_after
        )
        assert_normal_clients_unharmed(handler, run)
        assert len(handler) == NORMAL
        assert growth <= FROZEN * handler.max_queue_bytes + RSS_MARGIN
        assert handler.stats().closed == {"slow": FROZEN}
        assert counter_by(registry, "sse_connections_closed_total", "reason") == {"slow": FROZEN}

    await publish_to_frozen_and_normal(handler, check)


@pytest.mark.timeout(90)
async def test_frozen_readers_under_drop_oldest_stay_with_bounded_queues(
    fd_limit: int,
) -> None:
    # A bound well under what is published (150 KiB), so the oldest frames go.
    bound = 32 * 1024
    handler = TimedHandler(
        write_timeout=0,
        max_queue_bytes=bound,
        overflow_policy=OverflowPolicy.DROP_OLDEST,
        kernel_buffer=KERNEL_BUFFER,
    )
    registry = CollectorRegistry()
    register_metrics(handler, "events", registry)

    async def check(run: Run) -> None:
        growth = run.rss_peak - run.rss_before
        dropped = [conn.dropped for conn in run.frozen]
        print(
            f"\ndrop_oldest: frozen dropped {min(dropped)}-{max(dropped)} frames each "
            f"(total {sum(dropped)}; after half the run {run.dropped[EVENTS // 2]}); largest "
            f"frozen queue {run.max_frozen_queue} B of {bound}; RSS before "
            f"{run.rss_before / 2**20:.1f} MiB, peak growth {growth / 2**20:+.1f} MiB"
        )
        assert all(conn.is_active for conn in run.frozen)
        assert handler.closed == {}
        assert len(handler) == NORMAL + FROZEN
        # Every frozen connection drops, and keeps dropping as events come.
        assert min(dropped) > 0
        assert 0 < run.dropped[EVENTS // 2] < run.dropped[-1]
        assert run.max_frozen_queue <= bound
        assert_normal_clients_unharmed(handler, run)
        assert growth <= FROZEN * bound + RSS_MARGIN
        assert handler.stats().dropped == sum(dropped)
        assert counter_by(registry, "sse_dropped_total", "policy") == {"drop_oldest": sum(dropped)}
        assert handler.stats().closed == {}

    await publish_to_frozen_and_normal(handler, check)
