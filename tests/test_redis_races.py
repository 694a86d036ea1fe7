"""RedisBroker under concurrent subscribe, unsubscribe and close (found by the
scale-out storms of issue 11, reduced here to a few calls each).

* A fresh broker (no Pub/Sub connection yet) that is asked for many channels
  at once: a channel that is registered while the reader is opening its
  Pub/Sub connection must be subscribed too, not time out waiting for a
  confirmation that never comes. A handler that has just started meets
  exactly this when a reconnect storm arrives (a deploy).
* Connections that end while the broker is closing (a shutdown): their
  unsubscribes must end quietly, not raise out of redis-py's closed
  connection (the channel router logs that as "Uncaught exception in
  unsubscribing ...", an ERROR with a traceback).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis_server import RedisServer
from support import serve, wait_until

from sse_handler import ServerSentEvent, ServerSentEventHandler
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
