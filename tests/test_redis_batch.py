"""RedisBroker's publishes in batches (sse_handler.brokers.redis_batch), on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import warnings
from collections.abc import AsyncIterator

import pytest
import redis
from redis import asyncio as aioredis
from redis_server import RedisServer

from sse_handler import BrokerUnavailableError, ServerSentEvent
from sse_handler.brokers.redis import RedisBroker
from sse_handler.brokers.redis_batch import ScriptBatch
from sse_handler.brokers.redis_wire import position


@contextlib.asynccontextmanager
async def _broker(url: str) -> AsyncIterator[tuple[RedisBroker, aioredis.Redis]]:
    """A broker, and a plain client to look at what it stored."""
    broker = RedisBroker(url)
    raw = aioredis.Redis.from_url(url)
    try:
        yield broker, raw
    finally:
        await raw.aclose()
        await broker.close()


async def test_racing_publishes_share_one_connection_and_keep_the_order_of_the_calls(
    redis_server: RedisServer,
) -> None:
    async with _broker(redis_server.url) as (broker, raw):
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


async def test_a_flushed_script_is_loaded_again_and_each_publish_is_stored_once(
    redis_server: RedisServer,
) -> None:
    async with _broker(redis_server.url) as (broker, raw):
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


async def test_a_publish_that_fails_in_a_batch_leaves_the_others_stored(
    redis_server: RedisServer,
) -> None:
    async with _broker(redis_server.url) as (broker, raw):
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


async def test_a_publish_cancelled_before_it_leaves_is_never_stored(
    redis_server: RedisServer,
) -> None:
    async with _broker(redis_server.url) as (broker, raw):
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


async def test_a_publish_after_close_fails_clearly(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url)
    await broker.publish("c", ServerSentEvent(data="one"))
    await broker.close()
    with pytest.raises(BrokerUnavailableError, match="closed") as failed:
        await broker.publish("c", ServerSentEvent(data="two"))
    assert failed.value.published is False


async def test_close_while_a_batch_is_out_says_the_publish_may_have_run(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url)
    await broker.publish("c", ServerSentEvent(data="loads the script"))
    redis_server.pause()  # SIGSTOP: the batch is written, its reply never comes
    try:
        task = asyncio.ensure_future(broker.publish("c", ServerSentEvent(data="in flight")))
        await asyncio.sleep(0.1)  # a few turns of the loop: the write took one
        await broker.close()
        with pytest.raises(BrokerUnavailableError) as failed:
            await task
        # It was sent: Redis may run it once it goes on, and it does.
        assert failed.value.published is None
    finally:
        redis_server.resume()
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert [e[1][b"b"] for e in await raw.xrange(broker.stream_key("c"))] == [
            b"data: loads the script\n\n",
            b"data: in flight\n\n",
        ]
    finally:
        await raw.aclose()


async def test_a_publish_cancelled_while_its_batch_waits_to_be_tried_again_is_never_stored(
    redis_server: RedisServer,
) -> None:
    # Enough retries that Redis is back before they run out.
    broker = RedisBroker(redis_server.url, retries=20, max_backoff=0.2)
    try:
        await broker.publish("c", ServerSentEvent(data="before"))
        redis_server.kill()
        for _ in range(3):
            try:
                await asyncio.wait_for(broker.publish("c", ServerSentEvent(data="given up")), 0.08)
            except TimeoutError:
                break  # its caller gave up during a backoff: what is tested
            except BrokerUnavailableError:
                # The pooled connection was sent on before its end was read
                # (the kill's FIN not seen yet): that one fails at once.
                continue
        else:
            pytest.fail("no publish waited for Redis to come back")
        redis_server.start()
        await broker.publish("c", ServerSentEvent(data="after"))
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            # Redis restarted without its data: only what came after.
            assert [e[1][b"b"] for e in await raw.xrange(broker.stream_key("c"))] == [
                b"data: after\n\n"
            ]
        finally:
            await raw.aclose()
    finally:
        await broker.close()


class _PoolOfRedisPy50(aioredis.BlockingConnectionPool):
    """The checkout of redis-py before 5.3: a command's name is required."""

    async def get_connection(  # type: ignore[override]
        self, command_name: str, *keys: object, **options: object
    ) -> object:
        assert command_name
        if _REQUIRES_NAME:  # run on redis-py before 5.3 itself
            return await super().get_connection(command_name, *keys, **options)
        return await super().get_connection()


_NAME = inspect.signature(aioredis.BlockingConnectionPool.get_connection).parameters.get(
    "command_name"
)
_REQUIRES_NAME = _NAME is not None and _NAME.default is inspect.Parameter.empty


def _echo_batch(pool: object) -> ScriptBatch:
    """A batch of a script that answers its first argument, on ``pool``."""
    return ScriptBatch(
        pool,
        "return ARGV[1]",
        failure=lambda exc: BrokerUnavailableError(str(exc)),
        not_sent=lambda exc: False,
        retries=0,
        max_backoff=0.1,
    )


class _WrappedPool(_PoolOfRedisPy50):
    """A subclass that passes its arguments on, as RedisBroker's pool does."""

    async def get_connection(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        return await super().get_connection(*args, **kwargs)  # type: ignore[arg-type]


async def test_a_batch_checks_out_connections_from_a_pool_of_redis_py_5_0(
    redis_server: RedisServer,
) -> None:
    pool = _WrappedPool.from_url(redis_server.url)
    batch = _echo_batch(pool)
    try:
        assert await asyncio.gather(batch.run([], ["one"]), batch.run([], ["two"])) == [
            b"one",
            b"two",
        ]
    finally:
        await batch.close()
        await pool.disconnect()


def test_a_broker_goes_on_in_a_second_event_loop(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, timeout=2.0)
    first = asyncio.new_event_loop()
    first.run_until_complete(broker.publish("c", ServerSentEvent(data="one")))
    first.close()  # without cancelling its tasks: the batches' task stays behind

    async def second() -> list[str]:
        outcomes = []
        # The pooled connection belonged to the first loop: at most its
        # publish fails (clearly), and the next goes through.
        for data in ("two", "three", "four"):
            try:
                outcomes.append(
                    await asyncio.wait_for(broker.publish("c", ServerSentEvent(data=data)), 5)
                )
            except BrokerUnavailableError:
                outcomes.append("failed")
        await broker.close()
        return outcomes

    outcomes = asyncio.run(second())
    assert outcomes[1:] != ["failed", "failed"] and outcomes[-1] != "failed"
    # The first loop was closed with its connection open, as the case needs;
    # its socket is reclaimed here rather than in whichever test runs next.
    del first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_close_in_a_second_event_loop_never_raises(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, timeout=2.0)
    first = asyncio.new_event_loop()
    first.run_until_complete(broker.publish("c", ServerSentEvent(data="one")))
    first.close()  # without cancelling its tasks: the batches' task stays behind
    asyncio.run(broker.close())  # a process shutting down must get to its exit

    async def refused() -> None:
        with pytest.raises(BrokerUnavailableError, match="closed"):
            await broker.publish("c", ServerSentEvent(data="two"))

    asyncio.run(refused())
    del first
    with warnings.catch_warnings():  # the first loop's socket, reclaimed here
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _sending_tasks() -> list[asyncio.Task[object]]:
    """The tasks that send batches, of every ScriptBatch."""
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "ScriptBatch._drain"]  # type: ignore[union-attr]


async def _until(condition: object, seconds: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_retired_batch_answers_its_calls_and_then_its_task_ends(
    redis_server: RedisServer,
) -> None:
    pool = aioredis.ConnectionPool.from_url(redis_server.url)
    batch = _echo_batch(pool)
    try:
        before = len(_sending_tasks())
        # Retired with one call out and one queued: both are answered.
        calls = asyncio.gather(batch.run([], ["one"]), batch.run([], ["two"]))
        await asyncio.sleep(0)
        batch.retire()
        assert await calls == [b"one", b"two"]
        await _until(lambda: batch.finished)
        assert len(_sending_tasks()) == before
        # Idle, then retired: the task that waited for more ends.
        idle = _echo_batch(pool)
        assert await idle.run([], ["three"]) == b"three"
        assert len(_sending_tasks()) == before + 1  # waiting for the next call
        idle.retire()
        await _until(lambda: idle.finished)
        assert len(_sending_tasks()) == before
        await idle.close()
    finally:
        await batch.close()
        await pool.disconnect()


async def test_a_publish_while_redis_loads_its_data_was_not_stored_and_says_so(
    redis_server: RedisServer,
) -> None:
    # A restart with a dump to load: 10,000 keys of 2 KB, each loaded 300 µs
    # late (key-load-delay), hold Redis in loading for about 3 s. It answers
    # between every 2 MB loaded (about every 0.3 s), each command with
    # -LOADING: the command did not run.
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        for start in range(0, 10_000, 500):
            # Random, so that the dump does not compress them away.
            await raw.mset({f"k{i}": os.urandom(1_000).hex() for i in range(start, start + 500)})
        await raw.save()
    finally:
        await raw.aclose()
    redis_server.kill()
    loading = RedisServer(
        redis_server.port,
        redis_server.engine,
        ("--dir", redis_server.dir, "--key-load-delay", "300"),
    )
    loading.start(answering=False)
    broker = RedisBroker(loading.url, timeout=5.0)
    try:
        probe = aioredis.Redis.from_url(loading.url, socket_timeout=10)
        try:
            with pytest.raises(redis.exceptions.BusyLoadingError):
                await probe.ping()  # still loading: the case is set up
        finally:
            await probe.aclose()
        outcomes = await asyncio.gather(
            *(broker.publish("c", ServerSentEvent(data=str(i))) for i in range(3)),
            return_exceptions=True,
        )
        for outcome in outcomes:
            assert isinstance(outcome, BrokerUnavailableError), outcome
            assert outcome.published is False, outcome
            assert "loading" in str(outcome).lower()
    finally:
        await broker.close()
        loading.close()
