"""RedisBroker under concurrent subscribe, unsubscribe and close (found by the
scale-out storms of issue 11, reduced here to a few calls each).

* A fresh broker (no Pub/Sub connection yet) that is asked for many channels
  at once: a channel that is registered while the reader is opening its
  Pub/Sub connection must be subscribed too, not time out waiting for a
  confirmation that never comes. A handler that has just started meets
  exactly this when a reconnect storm arrives (a deploy).
* A client that resumes on a process whose Pub/Sub reader lags behind it:
  the process has not yet delivered the client's last event when the
  client comes back with its id, so that event arrives live after the
  (empty) replay. It must not be sent again.
* Connections that end while the broker is closing (a shutdown): their
  unsubscribes must end quietly, not raise out of redis-py's closed
  connection (the channel router logs that as "Uncaught exception in
  unsubscribing ...", an ERROR with a traceback).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from redis_server import RedisServer
from support import serve, wait_until

from sse_handler import (
    BrokerUnavailableError,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
)
from sse_handler.brokers import Delivery
from sse_handler.brokers.redis import RedisBroker


def fast_broker(url: str) -> RedisBroker:
    """Short timeouts: a subscription that is never confirmed fails in about
    2 s instead of the default 10 s."""
    return RedisBroker(url, timeout=1.0, block=1.0)


async def test_concurrent_first_subscribes_are_all_confirmed(redis_server: RedisServer) -> None:
    broker = fast_broker(redis_server.url)
    got: list[Delivery] = []
    broker.add_listener(got.append)
    channels = [f"user-{i}" for i in range(100)]
    try:
        results = await asyncio.gather(
            *(broker.subscribe(c) for c in channels), return_exceptions=True
        )
        failed = [c for c, result in zip(channels, results, strict=True) if result is not None]
        assert failed == [], f"{len(failed)} of {len(channels)} subscribes failed: {results[-1]!r}"
        ids = [await broker.publish(c, ServerSentEvent(data=c)) for c in channels]
        await wait_until(lambda: len(got) >= len(channels))
        assert [d.id for d in got] == ids
    finally:
        await broker.close()


def reading(handler: ServerSentEventHandler, channel: str) -> Callable[[], bool]:
    return lambda: len(handler.subscribers(channel)) == 1


async def test_a_fresh_handler_takes_a_storm_of_first_subscriptions(
    redis_server: RedisServer,
) -> None:
    """A plain handler on a broker that has subscribed nothing yet: 100 clients
    arrive at once, each on a channel of its own (per-user channels)."""
    broker = fast_broker(redis_server.url)
    handler = ServerSentEventHandler(broker=broker)
    try:
        async with serve([handler.route("/events")], handler) as server:
            channels = [f"user-{i}" for i in range(100)]
            clients = await asyncio.gather(
                *(server.stream(f"/events?channel={c}") for c in channels)
            )
            try:
                for client in clients:
                    assert client.status == 200
                    assert "Content-Length" not in client.headers, "turned away"
                subscribed = await asyncio.gather(
                    *(wait_until(reading(handler, c)) for c in channels), return_exceptions=True
                )
                missing = [c for c, result in zip(channels, subscribed, strict=True) if result]
                assert missing == [], f"{len(missing)} clients were never subscribed"
                for channel, client in zip(channels, clients, strict=True):
                    await handler.publish(channel, data=channel)
                    assert (await client.next_event()).data == channel
            finally:
                for client in clients:
                    client.close()
    finally:
        await broker.close()


async def test_unsubscribes_while_the_broker_closes_end_quietly(
    redis_server: RedisServer,
) -> None:
    broker = fast_broker(redis_server.url)
    channels = [f"user-{i}" for i in range(10)]
    for channel in channels:
        await broker.subscribe(channel)
    # close() begins (it cancels the reader first); connections that end
    # meanwhile unsubscribe their channels, as during a shutdown.
    closing = asyncio.ensure_future(broker.close())
    await asyncio.sleep(0)
    results = await asyncio.gather(
        *(broker.unsubscribe(c) for c in channels), return_exceptions=True
    )
    await closing
    assert [r for r in results if r is not None] == []


class LaggingBroker(RedisBroker):
    """A RedisBroker whose reader stops at each channel message while
    :attr:`gate` is clear: a process that reads Pub/Sub late. (On localhost a
    real reader lags by milliseconds, at random; the gate makes the lag
    deterministic, the rest -- Redis, the reader, the replay -- is real.)"""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout=1.0, block=1.0)
        self.gate = asyncio.Event()
        self.gate.set()
        self.stopped_at_gate = asyncio.Event()

    async def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "message" and not self.gate.is_set():
            self.stopped_at_gate.set()
            await self.gate.wait()
        await super()._on_message(message)


async def test_a_client_ahead_of_a_lagging_reader_does_not_get_its_last_event_again(
    redis_server: RedisServer,
) -> None:
    broker = LaggingBroker(redis_server.url)
    publisher = fast_broker(redis_server.url)  # another process's publish
    resumed = asyncio.Event()

    class Handler(ServerSentEventHandler):
        def on_connection_registered(self, conn: ServerSentEventConnection) -> None:
            if conn.last_event_id:
                resumed.set()  # its replay is done: it reads live events now

    handler = Handler(broker=broker)
    try:
        async with serve([handler.route("/events")], handler) as server:
            first = await server.stream("/events?channel=room")
            await wait_until(reading(handler, "room"))
            # The last event the client read elsewhere: published, stored,
            # and not yet delivered by this process's reader.
            broker.gate.clear()
            seen_id = await publisher.publish("room", ServerSentEvent(data="seen"))
            async with asyncio.timeout(5):
                await broker.stopped_at_gate.wait()
            second = await server.stream("/events?channel=room", {"Last-Event-ID": seen_id})
            assert second.status == 200
            async with asyncio.timeout(5):
                await resumed.wait()
            broker.gate.set()
            next_id = await publisher.publish("room", ServerSentEvent(data="next"))
            assert [(e.id, e.data) for e in await first.events(2)] == [
                (seen_id, "seen"),
                (next_id, "next"),
            ]
            assert [(e.id, e.data) for e in await second.events(1)] == [(next_id, "next")]
            first.close()
            second.close()
    finally:
        await broker.close()
        await publisher.close()


async def test_a_subscription_redis_never_confirms_fails_in_time_and_others_still_work(
    redis_server: RedisServer,
) -> None:
    """One timer for every pending confirmation (not a wait_for per channel):
    a SUBSCRIBE a paused Redis never answers fails after timeout + block with
    BrokerUnavailableError; once Redis is back the channel subscribes."""
    broker = fast_broker(redis_server.url)  # timeout + block = 2 s
    got: list[Delivery] = []
    broker.add_listener(got.append)
    try:
        await broker.subscribe("first")
        await broker.publish("first", ServerSentEvent(data="1"))
        await wait_until(lambda: len(got) == 1)
        redis_server.pause()  # SIGSTOP: the connections stay up, nothing answers
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(broker.subscribe(f"late-{i}") for i in range(3)), return_exceptions=True
                ),
                10,
            )
            waited = loop.time() - started
        finally:
            redis_server.resume()
        assert [type(result) for result in results] == [BrokerUnavailableError] * 3
        assert 1.5 < waited < 6, waited
        # Back: the same channel subscribes and receives.
        await broker.subscribe("late-0")
        event_id = await broker.publish("late-0", ServerSentEvent(data="2"))
        await wait_until(lambda: [d.id for d in got[1:]] == [event_id], timeout=10)
    finally:
        await broker.close()


async def test_a_burst_of_confirmations_is_handled_a_few_per_turn_of_the_loop(
    redis_server: RedisServer,
) -> None:
    """The reader handles at most 32 Pub/Sub messages per turn of the loop: the
    confirmations of a thousand new channels arrive at once, and each wakes
    a subscriber; all of them in one turn would hold back everything else."""
    broker = fast_broker(redis_server.url)
    turn = 0
    done_in: list[int] = []

    async def ticker() -> None:
        nonlocal turn
        while True:
            await asyncio.sleep(0)
            turn += 1

    async def subscribe(channel: str) -> None:
        await broker.subscribe(channel)
        done_in.append(turn)

    ticking = asyncio.ensure_future(ticker())
    try:
        await broker.subscribe("first")  # the reader is up
        await asyncio.gather(*(subscribe(f"user-{i}") for i in range(1000)))
        per_turn = collections.Counter(done_in)
        assert len(done_in) == 1000
        assert max(per_turn.values()) <= 40, per_turn
    finally:
        ticking.cancel()
        await broker.close()
