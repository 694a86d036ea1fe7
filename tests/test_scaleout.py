"""Scale-out correctness (issue 11): one scenario, run on both brokers.

Four publishers race for :data:`PUBLISH_FOR` seconds, each on its own channel
and through its own process's ``/publish``; six clients read one, two or four
of those channels, cut their connection (RST) every ~100 events and resume
with ``Last-Event-ID`` on the next process. Each client must end up with
exactly the events published to its channels: none missing, none twice, ids
strictly increasing in the broker's order, and never a ``reset``.

Redis: three demo processes on one real server (Redis 6.2 and Valkey 8, the
``redis_server`` fixture). Memory: one demo process, its clients resuming on
that same process. A MemoryBroker's sequence and history live in one process:
a second demo process has its own, so an id from the first is ``unknown_id``
there (a reset, by design). Two handlers in one process would not be more
meaningful either: the demo's two streams already share one broker through
its ``SharedBroker``, and what a resume can get wrong (the replay, its hand-off
to live delivery, the order across channels) is the broker's, the same
whichever handler asks.

A publisher's last event on each channel is a marker: a client has everything
once it has read the marker of each of its channels (the markers are
published after every other publish has been answered, so they are the
channels' last events).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from redis_server import RedisServer
from support import LoggedDemoProcess

from sse_handler.testing import EventStreamClient

CHANNELS = ("a", "b", "c", "d")
#: One client per entry: the channels it reads (1, 2 and 4 of them).
SUBSCRIPTIONS = (
    ("a",),
    ("d",),
    ("a", "b"),
    ("c", "d"),
    ("a", "b", "c", "d"),
    ("d", "c", "b", "a"),
)
PUBLISH_FOR = 10.0
#: The demo's history per channel, far above what the run publishes: the test
#: is about the hand-off, and a reader that falls behind under load (the
#: clients share the test's process with the publishers) must not be reset
#: for exceeding the default 1,000.
HISTORY = ("--history-size", "100000")
#: Publishes in flight per publisher ("as fast as they can, a few at a time").
IN_FLIGHT = 2
#: A client cuts its connection after this many events (drawn anew each time).
CUT_AFTER = (60, 140)
#: The longest a client waits for its next event, under the load of the run.
EVENT_TIMEOUT = 20.0
#: The data of a channel's last event.
MARKER = "end"

Order = Callable[[str], tuple[int, ...]]


def redis_order(event_id: str) -> tuple[int, ...]:
    """RedisBroker ids are ``<ms>-<n>``, ordered as the pair of integers."""
    ms, _, n = event_id.partition("-")
    return (int(ms), int(n))


def memory_order(event_id: str) -> tuple[int, ...]:
    """MemoryBroker ids are ``<epoch>-<seq>``, ``seq`` in base 36 (its ``position``);
    the epoch is the same for every id of one broker (checked separately)."""
    return (int(event_id.rpartition("-")[2], 36),)


@dataclass(frozen=True)
class Published:
    channel: str
    id: str
    data: str


@dataclass
class Reader:
    """One client: its channels and every event it read, across its connections."""

    channels: tuple[str, ...]
    seen: list[tuple[str, str]] = field(default_factory=list)  # (id, data)
    connections: int = 0
    #: For each event in ``seen``: the connection (from 1) it came on, whether
    #: before that connection's welcome (replayed) or after (live), and the
    #: ``Last-Event-ID`` that connection resumed from -- to tell a defect's cause.
    where: list[tuple[int, str, str | None]] = field(default_factory=list)


async def publish_for(
    proc: LoggedDemoProcess, channel: str, until: float, out: list[Published]
) -> None:
    """Publish ``<channel>:<n>`` through ``proc`` until ``until`` (loop time), then
    the channel's marker ``<channel>:end``."""
    loop = asyncio.get_running_loop()
    count = itertools.count()

    async def one(data: str) -> None:
        status, body = await proc.publish(data, channel=channel)
        assert status == 200, body
        out.append(Published(channel, body["id"], data))

    async def worker() -> None:
        while loop.time() < until:
            await one(f"{channel}:{next(count)}")

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    await one(f"{channel}:{MARKER}")


async def read_with_cuts(
    reader: Reader, urls: list[str], first: int, rng: random.Random, subscribed: asyncio.Event
) -> None:
    """Read until the marker of every channel came, hopping to the next process
    after every ~100 events (an abort, then ``Last-Event-ID``)."""
    query = "&".join(f"channel={c}" for c in reader.channels)
    markers_left = set(reader.channels)
    last_id: str | None = None
    for hop in itertools.count(first):
        url = f"{urls[hop % len(urls)]}/events?{query}"
        headers = {"Last-Event-ID": last_id} if last_id else {}
        client = await EventStreamClient.connect(url, headers)
        reader.connections += 1
        assert client.status == 200
        assert "Content-Length" not in client.headers, "turned away instead of a stream"
        cut_after = rng.randint(*CUT_AFTER)
        read = 0
        phase, resumed_from = "replayed", last_id
        while read < cut_after and markers_left:
            event = await client.next_event(timeout=EVENT_TIMEOUT)
            assert event.event != "reset", (
                f"client on {reader.channels} got a reset ({event.data}) on {url} "
                f"with Last-Event-ID {last_id}"
            )
            if event.event == "welcome":
                subscribed.set()  # subscribed; the replay (if any) came before it
                phase = "live"
                continue
            reader.seen.append((event.id, event.data))
            reader.where.append((reader.connections, phase, resumed_from))
            last_id = event.id
            read += 1
            channel, _, n = event.data.partition(":")
            if n == MARKER:
                markers_left.discard(channel)
        client.abort()
        if not markers_left:
            return


def defects(reader: Reader, published: list[Published], order: Order) -> list[str]:
    """What is wrong with what ``reader`` read, given what was published."""
    expected = sorted(
        ((p.id, p.data) for p in published if p.channel in reader.channels),
        key=lambda event: order(event[0]),
    )
    seen = reader.seen
    problems = []
    missing = set(expected) - set(seen)
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {sorted(missing)[:5]}")
    unknown = set(seen) - set(expected)
    if unknown:
        problems.append(f"{len(unknown)} never published here, e.g. {sorted(unknown)[:5]}")
    twice = [event for event, n in collections.Counter(seen).items() if n > 1]
    if twice:
        problems.append(
            f"{len(twice)} read more than once, e.g. {twice[:5]}; the first came "
            + "; ".join(
                f"{event[1]} as {[reader.where[i] for i, e in enumerate(seen) if e == event]}"
                for event in twice[:2]
            )
        )
    backwards = [
        (x, y, reader.where[i + 1])
        for i, ((x, _), (y, _)) in enumerate(itertools.pairwise(seen))
        if not order(x) < order(y)
    ]
    if backwards:
        problems.append(f"{len(backwards)} ids not after their predecessor, e.g. {backwards[:3]}")
    if not problems and seen != expected:
        problems.append("not in the broker's order")
    return [f"client on {','.join(reader.channels)}: {p}" for p in problems]


async def race(procs: list[LoggedDemoProcess], order: Order) -> list[Published]:
    """The scenario on running demo processes; fails on any client's defect."""
    urls = [p.url for p in procs]
    rng = random.Random(11)
    readers = [Reader(channels) for channels in SUBSCRIPTIONS]
    subscribed = [asyncio.Event() for _ in readers]
    reading = [
        asyncio.ensure_future(read_with_cuts(r, urls, i, random.Random(rng.random()), s))
        for i, (r, s) in enumerate(zip(readers, subscribed, strict=True))
    ]
    try:
        # Every client reads its channels before the first publish.
        async with asyncio.timeout(10):
            await asyncio.gather(*(s.wait() for s in subscribed))
        published: list[Published] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        until = started + PUBLISH_FOR
        await asyncio.gather(
            *(
                publish_for(procs[i % len(procs)], channel, until, published)
                for i, channel in enumerate(CHANNELS)
            )
        )
        published_in = loop.time() - started
        await asyncio.gather(*reading)
        drained_in = loop.time() - started - published_in
    finally:
        for task in reading:
            task.cancel()
    per_channel = dict(sorted(collections.Counter(p.channel for p in published).items()))
    print(
        f"\n{len(procs)} process(es): {len(published)} events published in {published_in:.1f} s "
        f"({len(published) / published_in:.0f}/s; per channel {per_channel});"
        f" clients drained {drained_in:.2f} s later; events read / connections per client: "
        + ", ".join(f"{''.join(r.channels)} {len(r.seen)}/{r.connections}" for r in readers)
    )
    assert len({p.id for p in published}) == len(published), "an id was given out twice"
    problems = [problem for r in readers for problem in defects(r, published, order)]
    assert problems == []
    # Each client was cut and resumed on other processes many times.
    assert min(r.connections for r in readers) >= 5
    return published


@pytest.mark.timeout(60)
async def test_resume_across_processes_redis(redis_server: RedisServer) -> None:
    procs = [LoggedDemoProcess("--redis", redis_server.url, *HISTORY) for _ in range(3)]
    await asyncio.gather(*(p.start() for p in procs))
    try:
        await race(procs, redis_order)
    finally:
        codes = await asyncio.gather(*(p.stop() for p in procs))
    assert codes == [0, 0, 0]
    for proc in procs:
        proc.assert_clean_log()


@pytest.mark.timeout(60)
async def test_resume_on_one_process_memory() -> None:
    proc = LoggedDemoProcess(*HISTORY)
    await proc.start()
    try:
        published = await race([proc], memory_order)
    finally:
        code = await proc.stop()
    assert code == 0
    proc.assert_clean_log()
    # One broker, one epoch: the order of memory_order covers every id.
    assert len({p.id.rpartition("-")[0] for p in published}) == 1
