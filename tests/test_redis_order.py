"""RedisBroker: one exact cursor over all of a client's channels, lost history
detected, and subscriptions that cost O(1) each (issue "Scale-out v2",
defects 1, 3 and 6), against a real Redis server."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterator

from redis import asyncio as aioredis
from redis_server import RedisServer

from sse_handler import ServerSentEvent
from sse_handler.brokers import Delivery
from sse_handler.brokers.redis import RedisBroker


async def _publish_racing(broker: RedisBroker, channels: list[str], per_channel: int) -> list[str]:
    """Four publishers at once, each on its own channel: ids in the same millisecond."""

    async def publisher(channel: str) -> list[str]:
        return [
            await broker.publish(channel, ServerSentEvent(data=f"{channel}:{i}"))
            for i in range(per_channel)
        ]

    runs = await asyncio.gather(*(publisher(c) for c in channels))
    return [event_id for run in runs for event_id in run]


async def test_ids_are_unique_and_ordered_across_channels(redis_server: RedisServer) -> None:
    # Defect 1: stream entry ids are per stream, so two channels publishing in
    # the same millisecond got the same id, and a client reading both could
    # not resume exactly from it.
    broker = RedisBroker(redis_server.url, block=0.5)
    channels = ["a", "b", "c", "d"]
    live: list[Delivery] = []
    broker.add_listener(live.append)
    for channel in channels:
        await broker.subscribe(channel)
    ids = await _publish_racing(broker, channels, 150)
    assert len(set(ids)) == len(ids) == 600
    deadline = asyncio.get_running_loop().time() + 10
    while len(live) < 600 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert len(live) == 600
    # Live delivery is in the broker's order: strictly increasing positions.
    positions = [d.position for d in live]
    assert all(p < q for p, q in itertools.pairwise(positions))
    # A client reading any subset of the channels resumes exactly from any cut.
    for subset in (["a", "b"], ["a", "b", "c", "d"], ["d"]):
        seen = [d for d in live if d.channel in subset]
        for cut in (0, 1, len(seen) // 3, len(seen) // 2, len(seen) - 2):
            replay = await broker.replay(subset, seen[cut].id)
            assert replay.reset is None
            assert [d.id for d in replay.deliveries] == [d.id for d in seen[cut + 1 :]]
    await broker.close()


async def test_a_reset_after_redis_restarts_without_its_data(redis_server: RedisServer) -> None:
    # Defect 3: after a restart without persistence, a client resuming from an
    # id of the old history got the later events and no reset.
    broker = RedisBroker(redis_server.url, block=0.3, max_backoff=0.1)
    first = await broker.publish("c", ServerSentEvent(data="1"))
    await broker.publish("c", ServerSentEvent(data="2"))
    redis_server.kill()
    redis_server.start()
    published = None
    for _ in range(100):  # pooled connections are replaced as Redis answers again
        try:
            published = await broker.publish("c", ServerSentEvent(data="3"))
            break
        except Exception:
            await asyncio.sleep(0.05)
    assert published is not None
    replay = await broker.replay(["c"], first)
    assert replay.reset is not None
    assert replay.deliveries == []
    # The new history resumes exactly.
    fourth = await broker.publish("c", ServerSentEvent(data="4"))
    replay = await broker.replay(["c"], published)
    assert (replay.reset, [d.id for d in replay.deliveries]) == (None, [fourth])
    await broker.close()


async def test_a_reset_when_redis_evicted_the_stream(redis_server: RedisServer) -> None:
    # Defect 3: a stream evicted under allkeys-lru was a silent gap.
    broker = RedisBroker(redis_server.url, block=0.3)
    first = await broker.publish("victim", ServerSentEvent(data="1"))
    await broker.publish("victim", ServerSentEvent(data="2" * 1000))
    raw = aioredis.Redis.from_url(redis_server.url)
    await raw.config_set("maxmemory-policy", "allkeys-lru")
    used = int((await raw.info("memory"))["used_memory"])
    await raw.config_set("maxmemory", str(used + 2_000_000))
    # Other channels fill memory until Redis evicts the victim's stream.
    n = 0
    while await raw.exists(broker.stream_key("victim")):
        assert n < 20_000, "Redis never evicted the stream"
        await broker.publish(f"filler{n % 500}", ServerSentEvent(data="x" * 2000))
        n += 1
    await raw.config_set("maxmemory", "0")
    await broker.publish("victim", ServerSentEvent(data="3"))
    replay = await broker.replay(["victim"], first)
    assert replay.reset is not None
    await raw.aclose()
    await broker.close()


async def test_a_cursor_from_the_future_gets_a_reset(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, block=0.3)
    last = await broker.publish("c", ServerSentEvent(data="1"))
    ms, _, seq = last.partition("-")
    for cursor in (f"{int(ms) + 60_000}-0", f"{ms}-{int(seq) + 5}"):
        assert (await broker.replay(["c"], cursor)).reset == "unknown_id"
    # A channel that never had an event, same cursor: still a reset.
    assert (await broker.replay(["empty"], f"{int(ms) + 60_000}-0")).reset == "unknown_id"
    await broker.close()


class _Monitor:
    """Redis's MONITOR on a raw socket: every command Redis runs, with its arguments."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.buffer = b""

    def drain(self, marker: bytes) -> list[bytes]:
        """Lines up to the command that carries ``marker``."""
        self.sock.settimeout(10)
        while marker not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "MONITOR connection closed"
            self.buffer += chunk
        return self.buffer.split(b"\r\n")

    def close(self) -> None:
        self.sock.close()


def _arguments(lines: list[bytes]) -> Iterator[int]:
    for line in lines:
        if line.startswith(b"+") and b'"' in line:
            yield line.count(b'" "') + 1


async def test_subscribing_n_channels_costs_o_n_broker_work(redis_server: RedisServer) -> None:
    # Defect 6: each new channel re-issued one XREAD over every subscribed
    # key: N channels cost O(N^2) keys read.
    broker = RedisBroker(redis_server.url, block=0.3)
    await broker.subscribe("warm-up")
    monitor = _Monitor(redis_server.port)
    n = 300
    for i in range(n):
        await broker.subscribe(f"user:{i}")
    raw = aioredis.Redis.from_url(redis_server.url)
    await raw.echo("end-of-subscriptions")
    lines = monitor.drain(b"end-of-subscriptions")
    monitor.close()
    total = sum(_arguments(lines))
    # Linear: a few arguments per channel. Quadratic would be ~n*n/2 = 45,000.
    assert total < 12 * n, total
    # And the channels are live.
    got: list[Delivery] = []
    broker.add_listener(got.append)
    await broker.publish("user:7", ServerSentEvent(data="hi"))
    deadline = asyncio.get_running_loop().time() + 5
    while not got and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert [d.channel for d in got] == ["user:7"]
    await raw.aclose()
    await broker.close()
