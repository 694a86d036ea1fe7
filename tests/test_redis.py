"""RedisBroker against a real Redis server: fan-out, replay, faults."""

from __future__ import annotations

import asyncio
import json
import os
import tracemalloc

import pytest
from redis import asyncio as aioredis
from redis_server import RedisServer
from support import DemoProcess, serve, wait_until

from sse_handler import BrokerUnavailableError, ServerSentEvent, ServerSentEventHandler
from sse_handler.brokers.redis import RedisBroker
from sse_handler.testing import EventStreamClient


async def test_two_handlers_share_channels_and_history(redis_server: RedisServer) -> None:
    a = ServerSentEventHandler(broker=RedisBroker(redis_server.url, block=0.5))
    b = ServerSentEventHandler(broker=RedisBroker(redis_server.url, block=0.5))
    async with serve([a.route("/events")], a) as sa, serve([b.route("/events")], b) as sb:
        on_a = await sa.stream("/events?channel=room")
        on_b = await sb.stream("/events?channel=room")
        await wait_until(lambda: len(a.subscribers("room")) == 1 == len(b.subscribers("room")))
        event_id = await a.publish("room", data="from a")
        for client in (on_a, on_b):
            event = await client.next_event()
            assert (event.data, event.id) == ("from a", event_id)
        # Entry ids: "<ms>-<seq>", ASCII.
        assert event_id.replace("-", "").isdigit()
        second = await b.publish("room", data="from b")
        assert (await on_a.next_event()).id == second
        assert (await on_b.next_event()).id == second
        # Resume on the other handler from the first id.
        resumed = await sb.stream("/events?channel=room", {"Last-Event-ID": event_id})
        assert (await resumed.next_event()).data == "from b"
        for client in (on_a, on_b, resumed):
            client.close()
    await a.broker.close()  # type: ignore[union-attr]
    await b.broker.close()  # type: ignore[union-attr]


async def test_reset_when_history_is_exceeded(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, history_size=10, block=0.5)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        ids = [await handler.publish("c", data=str(i)) for i in range(400)]
        old = await server.stream("/events?channel=c", {"Last-Event-ID": ids[0]})
        reset = await old.next_event()
        assert (reset.event, json.loads(reset.data)) == ("reset", {"reason": "history_exceeded"})
        bogus = await server.stream("/events?channel=c", {"Last-Event-ID": "not-an-id"})
        assert json.loads((await bogus.next_event()).data) == {"reason": "unknown_id"}
        recent = await server.stream("/events?channel=c", {"Last-Event-ID": ids[-3]})
        assert [e.data for e in await recent.events(2)] == ["398", "399"]
        await wait_until(lambda: len(handler.subscribers("c")) == 3)
        await handler.publish("c", data="live")
        for client in (old, bogus, recent):
            assert (await client.next_event()).data == "live"
            client.close()
    await broker.close()


async def test_publish_fails_clearly_while_redis_is_down(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, block=0.3, max_backoff=0.2)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream("/events?channel=c")
        await wait_until(lambda: len(handler.subscribers("c")) == 1)
        await handler.publish("c", data="before")
        assert (await client.next_event()).data == "before"
        redis_server.kill()
        with pytest.raises(BrokerUnavailableError, match="unavailable"):
            await handler.publish("c", ServerSentEvent(data="while down"))
        redis_server.start()
        # The reader reconnects by itself; publishing works again.
        await handler.publish("c", data="after")
        assert (await client.next_event(timeout=10)).data == "after"
        assert client.raw.count(b"while down") == 0
        client.close()
    await broker.close()


async def resume_through_disconnects(urls: list[str], publish: object, total: int) -> list[str]:
    """Read ``total`` events, cutting the connection every ~100 and resuming elsewhere."""
    seen: list[str] = []
    last_id: str | None = None
    hop = 0
    publisher: asyncio.Task[None] | None = None
    while len(seen) < total:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        client = await EventStreamClient.connect(
            urls[hop % len(urls)] + "/events?channel=load", headers
        )
        hop += 1
        if publisher is None:
            # The replay (none yet) goes before registered() and its welcome.
            assert (await client.next_event()).event == "welcome"
            # Subscribed now: start publishing while the client hops around.
            publisher = asyncio.ensure_future(publish())  # type: ignore[operator]
        while len(seen) < total:
            event = await client.next_event(timeout=20)
            assert event.event != "reset", "history must cover the outage"
            if event.event == "welcome":
                continue
            seen.append(event.data)
            last_id = event.id
            if len(seen) % 100 == 37:
                break
        client.abort()
    assert publisher is not None
    await publisher
    return seen


@pytest.mark.timeout(120)
async def test_1000_events_with_disconnects_memory_broker() -> None:
    from sse_handler.demo.app import make_app

    app, handler = make_app()
    async with serve(app, handler) as server:
        total = 1000

        async def publish() -> None:
            for i in range(total):
                await handler.publish("load", data=str(i))
                if i % 10 == 0:
                    await asyncio.sleep(0.001)  # let the client hop meanwhile

        seen = await resume_through_disconnects([server.url], publish, total)
    assert seen == [str(i) for i in range(total)]


@pytest.mark.timeout(180)
async def test_1000_events_with_disconnects_redis_three_processes(
    redis_server: RedisServer,
) -> None:
    procs = [DemoProcess("--redis", redis_server.url) for _ in range(3)]
    await asyncio.gather(*(p.start() for p in procs))
    try:
        total = 1000

        async def publish() -> None:
            for i in range(total):
                status, _ = await procs[i % 3].publish(str(i), channel="load")
                assert status == 200

        seen = await resume_through_disconnects([p.url for p in procs], publish, total)
        assert seen == [str(i) for i in range(total)]
    finally:
        codes = await asyncio.gather(*(p.stop() for p in procs))
    assert codes == [0, 0, 0]


@pytest.mark.timeout(120)
async def test_fan_out_and_redis_restart_across_processes(redis_server: RedisServer) -> None:
    one, two = DemoProcess("--redis", redis_server.url), DemoProcess("--redis", redis_server.url)
    await asyncio.gather(one.start(), two.start())
    try:
        client = await EventStreamClient.connect(two.url + "/events?channel=x")
        assert (await client.next_event()).event == "welcome"
        status, body = await one.publish("hello from one", channel="x")
        assert status == 200
        event = await client.next_event(timeout=10)
        assert (event.data, event.id) == ("hello from one", body["id"])

        redis_server.kill()
        status, body = await one.publish("lost", channel="x")
        assert status == 503
        assert "unavailable" in body["error"]
        redis_server.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while (status := (await one.publish("back", channel="x"))[0]) != 200:
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
        assert (await client.next_event(timeout=15)).data == "back"
        assert b"lost" not in client.raw
        client.close()
    finally:
        codes = await asyncio.gather(one.stop(), two.stop())
    assert codes == [0, 0]


async def test_the_engines_are_redis_6_2_and_valkey(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    info = await client.info("server")
    await client.aclose()
    if os.environ.get("SSE_TEST_REDIS_SERVER"):
        return  # one engine of the runner's choice, whatever it is
    if redis_server.engine == "valkey":
        assert str(info.get("server_name", "")).lower() == "valkey"
    else:
        assert str(info["redis_version"]).startswith("6.2.")


@pytest.mark.timeout(60)
async def test_paused_redis_fails_publishers_and_resumes_without_duplicates(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url, block=0.2, timeout=0.5, max_backoff=0.2)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream("/events?channel=c")
        await handler.publish("c", data="before")
        assert (await client.next_event()).data == "before"
        redis_server.pause()  # SIGSTOP: the TCP connections stay up, nothing answers
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(BrokerUnavailableError):
                await handler.publish("c", data="while paused")
            assert loop.time() - start < 3.0  # bounded by the command timeout
            # Failing publishes keep nothing in memory: nothing to grow while away.
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(5):
                with pytest.raises(BrokerUnavailableError) as failed:
                    await handler.publish("c", data=f"{i} " + "x" * 10_000)
                # A timeout cannot tell whether Redis will still run the command.
                assert failed.value.published is None
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            assert grown < 512 * 1024
            await asyncio.sleep(1.0)  # past the reader's block + timeout: what is tested
        finally:
            redis_server.resume()
        deadline = loop.time() + 10
        while True:
            try:
                await handler.publish("c", data="after")
                break
            except BrokerUnavailableError:
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
        await handler.publish("c", data="and again")
        seen = []
        while not seen or seen[-1] != "and again":
            seen.append((await client.next_event(timeout=10)).data)
        # Commands that timed out while Redis was paused may still have run
        # once it resumed; whatever arrives, arrives once, and the stream goes on.
        assert len(seen) == len(set(seen))
        assert seen[-2:] == ["after", "and again"]
        assert set(seen[:-2]) <= {"while paused", *(f"{i} " + "x" * 10_000 for i in range(5))}
        client.close()
    await broker.close()
