"""RedisBroker's publishes in batches (sse_handler.brokers.redis_batch), on a real Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis import asyncio as aioredis
from redis_server import RedisServer

from sse_handler import BrokerUnavailableError, ServerSentEvent
from sse_handler.brokers.redis import RedisBroker
from sse_handler.brokers.redis_wire import position


async def test_racing_publishes_share_one_connection_and_keep_the_order_of_the_calls(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await broker.publish("warm", ServerSentEvent(data="the first connection"))
        before = (await raw.info("stats"))["total_connections_received"]
        ids = await asyncio.gather(
            *(broker.publish(f"c{i % 7}", ServerSentEvent(data=str(i))) for i in range(300))
        )
        after = (await raw.info("stats"))["total_connections_received"]
        # One pooled connection carried all 300: they left in batches.
        assert after == before
        positions = [position(i) for i in ids]
        assert all(p is not None for p in positions)
        assert positions == sorted(positions) and len(set(positions)) == 300
        assert sum([await raw.xlen(broker.stream_key(f"c{k}")) for k in range(7)]) == 300
    finally:
        await raw.aclose()
        await broker.close()


async def test_a_flushed_script_is_loaded_again_and_each_publish_is_stored_once(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await broker.publish("c", ServerSentEvent(data="loads the script"))
        await raw.script_flush()  # as after a restart of Redis without its data
        ids = await asyncio.gather(
            *(broker.publish("c", ServerSentEvent(data=str(i))) for i in range(50))
        )
        assert len(set(ids)) == 50
        entries = await raw.xrange(broker.stream_key("c"))
        assert len(entries) == 51
        assert [e[1][b"b"].split(b"data: ")[1] for e in entries[1:]] == [
            f"{i}\n\n".encode() for i in range(50)
        ]
    finally:
        await raw.aclose()
        await broker.close()


async def test_a_publish_that_fails_in_a_batch_leaves_the_others_stored(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.set(broker.stream_key("bad"), "another program's string")
        results = await asyncio.gather(
            *(
                broker.publish("bad" if i == 10 else "good", ServerSentEvent(data=str(i)))
                for i in range(21)
            ),
            return_exceptions=True,
        )
        failed = results.pop(10)
        assert isinstance(failed, BrokerUnavailableError)
        assert "WRONGTYPE" in str(failed) and failed.published is False
        assert all(isinstance(r, str) for r in results)
        assert await raw.xlen(broker.stream_key("good")) == 20
    finally:
        await raw.aclose()
        await broker.close()


async def test_a_publish_cancelled_before_it_leaves_is_never_stored(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await broker.publish("c", ServerSentEvent(data="kept"))
        task = asyncio.ensure_future(broker.publish("c", ServerSentEvent(data="cancelled")))
        await asyncio.sleep(0)  # it queued its call and waits for the answer
        task.cancel()
        kept = await broker.publish("c", ServerSentEvent(data="kept too"))
        with pytest.raises(asyncio.CancelledError):
            await task
        entries = await raw.xrange(broker.stream_key("c"))
        assert [e[1][b"b"] for e in entries] == [
            b"data: kept\n\n",
            b"data: kept too\n\n",
        ]
        assert entries[-1][0].decode() == kept
    finally:
        await raw.aclose()
        await broker.close()


async def test_a_publish_after_close_fails_clearly(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url)
    await broker.publish("c", ServerSentEvent(data="one"))
    await broker.close()
    with pytest.raises(BrokerUnavailableError, match="closed") as failed:
        await broker.publish("c", ServerSentEvent(data="two"))
    assert failed.value.published is False
