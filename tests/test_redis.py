"""RedisBroker against a real Redis server: fan-out, replay, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis import asyncio as aioredis
from redis.crc import key_slot
from redis_server import RedisServer
from support import DemoProcess, serve, wait_until
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import bind_unused_port

from sse_handler import BrokerUnavailableError, ServerSentEvent, ServerSentEventHandler
from sse_handler.brokers import Delivery
from sse_handler.brokers.redis import RedisBroker, channel_key
from sse_handler.testing import EventStreamClient, StreamEnded


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
        before = await handler.publish("c", data="before")
        assert (await client.next_event()).data == "before"
        redis_server.kill()
        with pytest.raises(BrokerUnavailableError, match="unavailable"):
            await handler.publish("c", ServerSentEvent(data="while down"))
        redis_server.start()
        # Redis came back without its data: the reader cannot know what was
        # published before the crash, so the client is sent to resume by
        # Last-Event-ID, where it is told of the lost history.
        with pytest.raises(StreamEnded):
            await client.next_event(timeout=10)
        resumed = await server.stream("/events?channel=c", {"Last-Event-ID": before})
        reset = await resumed.next_event(timeout=10)
        assert reset.event == "reset"
        # Publishing works again and reaches the resumed client.
        await handler.publish("c", data="after")
        assert (await resumed.next_event(timeout=10)).data == "after"
        assert client.raw.count(b"while down") == resumed.raw.count(b"while down") == 0
        resumed.close()
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
        # Redis lost its data: the stream ends, the client resumes by
        # Last-Event-ID on the other process and is told of the lost history.
        with pytest.raises(StreamEnded):
            await client.next_event(timeout=15)
        resumed = await EventStreamClient.connect(
            one.url + "/events?channel=x", {"Last-Event-ID": event.id or ""}
        )
        reset = await resumed.next_event(timeout=15)
        assert (reset.event, json.loads(reset.data)) == ("reset", {"reason": "unknown_id"})
        assert (await resumed.next_event(timeout=15)).event == "welcome"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while (status := (await two.publish("back", channel="x"))[0]) != 200:
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
        assert (await resumed.next_event(timeout=15)).data == "back"
        assert b"lost" not in client.raw + resumed.raw
        client.close()
        resumed.close()
    finally:
        codes = await asyncio.gather(one.stop(), two.stop())
    assert codes == [0, 0]


async def test_the_engines_are_redis_6_2_redis_7_and_valkey(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    info = await client.info("server")
    await client.aclose()
    if os.environ.get("SSE_TEST_REDIS_SERVER"):
        return  # one engine of the runner's choice, whatever it is
    if redis_server.engine == "valkey":
        assert str(info.get("server_name", "")).lower() == "valkey"
    elif redis_server.engine == "redis7":
        assert str(info["redis_version"]).startswith("7.")
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


# ------------------------------------------------------------ the connection pool


@pytest.mark.timeout(60)
async def test_300_concurrent_publishes_wait_for_a_pooled_connection(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url)
    try:
        ids = await asyncio.gather(
            *(broker.publish("busy", ServerSentEvent(data=str(i))) for i in range(300))
        )
        assert len(set(ids)) == 300
        raw = aioredis.Redis.from_url(redis_server.url)
        assert await raw.xlen(broker.stream_key("busy")) == 300
        await raw.aclose()
    finally:
        await broker.close()


@pytest.fixture
def fd_limit() -> Iterator[None]:
    """Room for 2,000 client sockets and their 2,000 server ends in this process."""
    want = 8192
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        yield
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {want} (hard limit {hard}): {exc}")
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(180)
async def test_2000_concurrent_replays_all_get_their_events(
    redis_server: RedisServer, fd_limit: None
) -> None:
    broker = RedisBroker(redis_server.url, block=0.5)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        ids = [await handler.publish("r", data=str(i)) for i in range(5)]

        async def resume() -> list[str]:
            client = await EventStreamClient.connect(
                server.url + "/events?channel=r", {"Last-Event-ID": ids[0]}, timeout=60
            )
            try:
                return [e.data for e in await client.events(4, timeout=120)]
            finally:
                client.close()

        results = await asyncio.gather(*(resume() for _ in range(2000)), return_exceptions=True)
        failed = [r for r in results if not isinstance(r, list)]
        assert not failed, f"{len(failed)} failed, e.g. {failed[0]!r}"
        assert all(r == ["1", "2", "3", "4"] for r in results)
    await broker.close()


async def test_a_replay_that_cannot_be_read_turns_the_client_away_with_a_retry_hint(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url, block=0.3, max_backoff=0.2, timeout=1.0)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        first = await server.stream("/events?channel=c")
        await wait_until(lambda: len(handler.subscribers("c")) == 1)
        event_id = await handler.publish("c", data="one")
        assert (await first.next_event()).data == "one"
        redis_server.kill()
        # The process reads "c" already: only the replay needs Redis.
        late = await server.stream("/events?channel=c", {"Last-Event-ID": event_id})
        assert await late.wait_closed(timeout=15) == []
        assert late.parser.retry is not None
        assert b"retry:" in late.raw
        first.close()
    await broker.close()


# ------------------------------------------------------------ hostile Last-Event-IDs


async def test_hostile_last_event_ids_get_an_exact_replay_or_a_reset(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = RedisBroker(redis_server.url, block=0.5)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        ids = [await handler.publish("c", data=str(i)) for i in range(3)]
        ms, seq = (int(part) for part in ids[-1].split("-"))
        unknown = [
            "18446744073709551616-0",  # beyond Redis's 64-bit milliseconds
            "1-18446744073709551616",  # beyond the 64-bit sequence
            "99999999999999999999999999999999-99999999999999999999999999999999",
            "²-0",  # str.isdigit() says yes, int() says no
            "1-¹",
            "-1-0",
            "1-",
            "-",
            "1--1",
            "0x10-0",
            "1 -0",
            "1e3-0",
            "not-an-id",
            # From the future: greater than every entry of the channel.
            f"{ms + 10**6}-0",
            f"{ms}-{seq + 1}",
            "18446744073709551615-18446744073709551615",
        ]
        # Not Latin-1, so through the query string (UTF-8).
        in_query = ["%D9%A3-0", "%EF%BC%91-0"]  # Arabic-Indic 3, fullwidth 1
        caplog.set_level(logging.WARNING)
        clients = [
            *[await server.stream("/events?channel=c", {"Last-Event-ID": i}) for i in unknown],
            *[await server.stream(f"/events?channel=c&last_event_id={q}") for q in in_query],
        ]
        for lei, client in zip([*unknown, *in_query], clients, strict=True):
            event = await client.next_event()
            reset = (event.event, json.loads(event.data))
            assert reset == ("reset", {"reason": "unknown_id"}), lei
        # Ids older than this history: its events after them may be lost.
        for lei in ("1-0", "00001-0", f"{int(ids[0].split('-')[0]) - 1}-0"):
            client = await server.stream("/events?channel=c", {"Last-Event-ID": lei})
            event = await client.next_event()
            assert (event.event, json.loads(event.data)) == (
                "reset",
                {"reason": "history_exceeded"},
            ), lei
            clients.append(client)
        # Ids in range that the history covers get an exact replay.
        exact = []
        for lei in ("0-0", "00-000", ids[0]):
            client = await server.stream("/events?channel=c", {"Last-Event-ID": lei})
            want = 3 if lei != ids[0] else 2
            assert [e.data for e in await client.events(want)] == ["0", "1", "2"][-want:], lei
            exact.append(client)
        await wait_until(lambda: len(handler.subscribers("c")) == len(clients) + len(exact))
        await handler.publish("c", data="live")
        for client in [*clients, *exact]:
            assert (await client.next_event()).data == "live"
            client.close()
    await broker.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# ------------------------------------------------------------ the caller-id lookup


@pytest.mark.timeout(90)
async def test_a_non_entry_id_costs_a_bounded_lookup_on_a_long_history(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url, history_size=100_000, block=0.5)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await broker.publish("h", ServerSentEvent(data="old", id="order-old"))
        filler = ServerSentEvent(data="x" * 200)
        for _ in range(200):
            await asyncio.gather(*(broker.publish("h", filler) for _ in range(50)))
        await broker.publish("h", ServerSentEvent(data="new", id="order-17"))
        after = [await broker.publish("h", ServerSentEvent(data=f"after {i}")) for i in range(2)]

        async def output_bytes() -> int:
            return int((await raw.info("stats"))["total_net_output_bytes"])

        before = await output_bytes()
        resumed = await broker.replay(["h"], "order-17")
        unknown = await broker.replay(["h"], "no-such-id")
        spent = await output_bytes() - before
        assert [d.id for d in resumed.deliveries] == after
        assert resumed.reset is None
        assert unknown.reset == "unknown_id"
        # The whole history is over 2 MB; the lookups read a few entries at most.
        assert spent < 64 * 1024, spent
        # A caller id deep in the history still resumes exactly.
        deep = await broker.replay(["h"], "order-old")
        assert len(deep.deliveries) == 10_003
        assert deep.deliveries[-1].id == after[-1]
    finally:
        await raw.aclose()
        await broker.close()


# ------------------------------------------------------------ the reader


async def test_a_malformed_entry_is_skipped_with_a_warning(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = RedisBroker(redis_server.url, block=0.5)
    handler = ServerSentEventHandler(broker=broker)
    raw = aioredis.Redis.from_url(redis_server.url)
    caplog.set_level(logging.WARNING, logger="sse_handler.redis")
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream("/events?channel=m")
        await wait_until(lambda: len(handler.subscribers("m")) == 1)
        before = await handler.publish("m", data="before")
        assert (await client.next_event()).data == "before"
        # Written by something else: no body field, and a body that is no
        # frame, into the stream and onto the Pub/Sub channel.
        key = broker.stream_key("m")
        await raw.xadd(key, {"x": "written by another program"})
        await raw.xadd(key, {"b": "data: no blank line"})
        await raw.publish(channel_key(broker.prefix, "m", "p"), "written by another program")
        await raw.publish(channel_key(broker.prefix, "m", "p"), "9-9\n\ndata: no blank line")
        await handler.publish("m", data="after")
        assert (await client.next_event()).data == "after"
        assert broker.reader_healthy
        # A replay skips them too.
        resumed = await server.stream("/events?channel=m", {"Last-Event-ID": before})
        assert (await resumed.next_event()).data == "after"
        warnings = [r for r in caplog.records if r.name == "sse_handler.redis"]
        assert any("malformed" in r.getMessage() for r in warnings)
        assert all(r.levelno == logging.WARNING for r in warnings)
        assert broker.malformed_entries == 4
        client.close()
        resumed.close()
    await raw.aclose()
    await broker.close()


class FailsOnce(RedisBroker):
    """A broker whose delivery path raises once: a bug the reader must survive."""

    failed = False

    def _deliver(self, delivery: Delivery) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected fault")
        super()._deliver(delivery)


async def test_the_reader_restarts_after_an_unexpected_error(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = FailsOnce(redis_server.url, block=0.5, max_backoff=0.2)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream("/events?channel=f")
        await wait_until(lambda: len(handler.subscribers("f")) == 1)
        await handler.publish("f", data="lost to the fault")
        await wait_until(lambda: broker.failed)
        await handler.publish("f", data="after the restart")
        assert (await client.next_event(timeout=10)).data == "after the restart"
        assert broker.reader_restarts == 1
        assert any("injected fault" in r.getMessage() or r.exc_info for r in caplog.records)
        await wait_until(lambda: broker.reader_healthy)
        client.close()
    await broker.close()


@pytest.mark.timeout(60)
async def test_reader_health_follows_redis_and_shows_in_the_demo_metrics(
    redis_server: RedisServer,
) -> None:
    from sse_handler.demo.app import make_app

    broker = RedisBroker(redis_server.url, block=0.3, max_backoff=0.2, timeout=1.0)
    app, handler = make_app(broker=broker)
    http = AsyncHTTPClient()
    async with serve(app, handler) as server:

        async def healthy_metric() -> bytes:
            body: bytes = (await http.fetch(server.url + "/metrics")).body
            return body.split(b'sse_broker_reader_healthy{endpoint="events"} ')[1][:3]

        client = await server.stream("/events?channel=h")
        await wait_until(lambda: len(handler.subscribers("h")) == 1)
        await wait_until(lambda: broker.reader_healthy)
        assert broker.reader_error is None
        assert await healthy_metric() == b"1.0"
        redis_server.kill()
        await wait_until(lambda: not broker.reader_healthy, timeout=10)
        assert broker.reader_error
        assert await healthy_metric() == b"0.0"
        redis_server.start()
        await wait_until(lambda: broker.reader_healthy, timeout=15)
        assert await healthy_metric() == b"1.0"
        client.close()
    await broker.close()


class _Relay:
    """A TCP hop to Redis whose connections can go silent: open, carrying
    nothing either way, as behind a partition or on a host that vanished (no
    FIN, no RST). Why a relay and not a real partition: cutting one
    connection to a local Redis needs a network namespace for Redis and a
    firewall rule; the relay drops the bytes where the network would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._silent: set[asyncio.StreamWriter] = set()
        self._carried: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    def silence(self) -> None:
        """Every connection carried so far carries nothing more; new ones do."""
        self._silent.update(self._carried)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._carried:
            writer.close()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._carried += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if dst not in self._silent:
                    dst.write(data)
            dst.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_reader_whose_connection_goes_silent_reconnects_and_delivers_what_it_missed(
    redis_server: RedisServer,
) -> None:
    relay = _Relay(redis_server.port)
    reader = RedisBroker(await relay.start(), block=0.3, timeout=0.5, max_backoff=0.2)
    publisher = RedisBroker(redis_server.url)
    got: list[bytes] = []
    reader.add_listener(lambda delivery: got.append(delivery.frame))
    try:
        await reader.subscribe("h")
        await publisher.publish("h", ServerSentEvent(data="before"))
        await wait_until(lambda: len(got) == 1)
        relay.silence()
        await publisher.publish("h", ServerSentEvent(data="during"))
        # The reader's connection says nothing, and nothing fails on it: the
        # reader must notice by itself, and say so.
        await wait_until(lambda: not reader.reader_healthy, timeout=10)
        assert "PING" in (reader.reader_error or "")
        await wait_until(lambda: len(got) == 2, timeout=10)
        assert reader.reader_healthy
        await publisher.publish("h", ServerSentEvent(data="after"))
        await wait_until(lambda: len(got) == 3)
        assert [frame.split(b"data: ")[1] for frame in got] == [
            b"before\n\n",
            b"during\n\n",
            b"after\n\n",
        ]
    finally:
        await reader.close()
        await publisher.close()
        await relay.close()


async def test_a_quiet_connection_is_pinged_and_kept(redis_server: RedisServer) -> None:
    """The reader reads without a timeout; its watch PINGs a quiet
    connection, and an answered PING keeps it: no reconnect, no catch-up."""
    reader = RedisBroker(redis_server.url, block=0.1, timeout=0.3)
    raw = aioredis.Redis.from_url(redis_server.url)
    got: list[bytes] = []
    reader.add_listener(lambda delivery: got.append(delivery.frame))

    async def pubsub_clients() -> list[str]:
        listed = (await raw.execute_command("CLIENT", "LIST", "TYPE", "pubsub")).decode()
        return [line.split()[0] for line in listed.splitlines()]

    async def pings() -> int:
        stats = await raw.info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))

    try:
        await reader.subscribe("q")
        first = await pubsub_clients()
        assert len(first) == 1
        before = await pings()
        for _ in range(200):  # ten PINGs are a second of quiet
            if await pings() >= before + 10:
                break
            await asyncio.sleep(0.05)
        assert await pings() >= before + 10
        assert await pubsub_clients() == first  # the same connection (id=...)
        assert reader.reader_healthy and reader.reader_restarts == 0
        publisher = RedisBroker(redis_server.url)
        await publisher.publish("q", ServerSentEvent(data="still here"))
        await publisher.close()
        await wait_until(lambda: len(got) == 1)
        assert got[0].endswith(b"data: still here\n\n")
    finally:
        await reader.close()
        await raw.aclose()


# ------------------------------------------------------------ a Redis restart


@pytest.mark.timeout(60)
async def test_publishes_succeed_once_a_restarted_redis_answers(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(redis_server.url, block=0.3, max_backoff=0.2)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream("/events?channel=r")
        await wait_until(lambda: len(handler.subscribers("r")) == 1)
        # Sixty pooled connections, all of them to the server about to go.
        await asyncio.gather(*(handler.publish("r", data="warm") for _ in range(60)))
        await client.events(60)
        redis_server.kill()
        redis_server.start()
        raw = aioredis.Redis.from_url(redis_server.url)
        assert await raw.ping()
        await raw.aclose()
        # Redis lost its data: the live stream is sent to resume (and would
        # get a reset); a new client reads what is published from now on.
        with pytest.raises(StreamEnded):
            await client.next_event(timeout=15)
        fresh = await server.stream("/events?channel=r")
        await wait_until(lambda: len(handler.subscribers("r")) == 1)
        results = await asyncio.gather(
            *(handler.publish("r", data=str(i)) for i in range(60)), return_exceptions=True
        )
        failed = [r for r in results if not isinstance(r, str)]
        assert not failed, f"{len(failed)} of 60 failed, e.g. {failed[0]!r}"
        got = [e.data for e in await fresh.events(60, timeout=15)]
        assert sorted(got, key=int) == [str(i) for i in range(60)]
        client.close()
        fresh.close()
    await broker.close()


# ------------------------------------------------------------ the key layout


async def test_nested_prefixes_never_share_keys(redis_server: RedisServer) -> None:
    outer = RedisBroker(redis_server.url, prefix="sse:", block=0.5)
    inner = RedisBroker(redis_server.url, prefix="sse:tenant2:", block=0.5)
    names = ["secrets", "tenant2:secrets", "c:secrets", "tenant2:c:secrets", "", ":", "%", "{x}"]
    seen: dict[str, list[Delivery]] = {"outer": [], "inner": []}
    outer.add_listener(seen["outer"].append)
    inner.add_listener(seen["inner"].append)
    try:
        for name in names:
            await outer.subscribe(name)
            await inner.subscribe(name)
        for name in names:
            await outer.publish(name, ServerSentEvent(data=f"outer {name}"))
            await inner.publish(name, ServerSentEvent(data=f"inner {name}"))
        await wait_until(lambda: len(seen["outer"]) == len(seen["inner"]) == len(names))
        for who, broker in (("outer", outer), ("inner", inner)):
            for delivery in seen[who]:
                assert delivery.frame.endswith(f"data: {who} {delivery.channel}\n\n".encode())
            for name in names:
                history = await broker.replay([name], "0-0")
                assert [d.frame.split(b"data: ")[1] for d in history.deliveries] == [
                    f"{who} {name}\n\n".encode()
                ]
        raw = aioredis.Redis.from_url(redis_server.url)
        keys = {k.decode() async for k in raw.scan_iter()}
        await raw.aclose()
        outer_keys = {outer.stream_key(n) for n in names}
        inner_keys = {inner.stream_key(n) for n in names}
        assert len(outer_keys) == len(inner_keys) == len(names)
        assert not outer_keys & inner_keys
        assert outer_keys | inner_keys <= keys
    finally:
        await outer.close()
        await inner.close()


@settings(max_examples=500)
@given(
    prefix=st.text(max_size=12),
    longer=st.text(min_size=1, max_size=12),
    a=st.text(max_size=12),
    b=st.text(max_size=12),
    kinds=st.tuples(st.sampled_from("ciw"), st.sampled_from("ciw")),
)
def test_keys_of_nested_prefixes_never_collide(
    prefix: str, longer: str, a: str, b: str, kinds: tuple[str, str]
) -> None:
    # Every key: <prefix><kind letter>:<text without ":">; wake keys are
    # <prefix>w:<hex>, a case of the same shape.
    assert channel_key(prefix, a, kinds[0]) != channel_key(prefix + longer, b, kinds[1])
    if a != b or kinds[0] != kinds[1]:
        assert channel_key(prefix, a, kinds[0]) != channel_key(prefix, b, kinds[1])


@given(channel=st.text())
def test_a_hash_tag_in_the_prefix_puts_every_key_in_its_slot(channel: str) -> None:
    slot = key_slot(b"{app}")
    for kind in "ciw":
        assert key_slot(channel_key("sse:{app}:", channel, kind).encode()) == slot
    # Without a tag in the prefix, a channel name cannot choose the slot.
    assert b"{" not in channel_key("sse:", channel).encode()[4:]


async def test_a_key_that_is_no_stream_does_not_silence_the_other_channels(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = RedisBroker(redis_server.url, block=0.3, max_backoff=0.2)
    got: list[Delivery] = []
    broker.add_listener(got.append)
    raw = aioredis.Redis.from_url(redis_server.url)
    caplog.set_level(logging.WARNING, logger="sse_handler.redis")
    try:
        await broker.subscribe("good")
        await raw.set(broker.stream_key("bad"), "another program's string")
        await broker.subscribe("bad")
        await broker.publish("good", ServerSentEvent(data="one"))
        await wait_until(lambda: len(got) == 1)
        # Publishing to it fails clearly; a replay over it reads the others.
        with pytest.raises(BrokerUnavailableError, match="WRONGTYPE"):
            await broker.publish("bad", ServerSentEvent(data="refused"))
        await broker.publish("good", ServerSentEvent(data="one and a half"))
        assert (
            (await broker.replay(["good", "bad"], got[0].id))
            .deliveries[0]
            .frame.endswith(b"data: one and a half\n\n")
        )
        await wait_until(lambda: len(got) == 2)
        # Once it is a stream again, it is read again.
        await raw.delete(broker.stream_key("bad"))
        await broker.publish("bad", ServerSentEvent(data="two"))
        await broker.publish("good", ServerSentEvent(data="three"))
        await wait_until(lambda: len(got) == 4)
        assert [d.channel for d in got[2:]] == ["bad", "good"]
        replay = await broker.replay(["good", "bad"], got[0].id)
        assert [d.frame.split(b"data: ")[1] for d in replay.deliveries] == [
            b"one and a half\n\n",
            b"two\n\n",
            b"three\n\n",
        ]
    finally:
        await raw.aclose()
        await broker.close()


async def test_the_id_hash_stays_bounded(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, history_size=10)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        for i in range(400):
            await broker.publish("p", ServerSentEvent(data=str(i), id=f"order-{i}"))
        await wait_until(lambda: not broker._pruning)
        index = channel_key(broker.prefix, "p", "i")
        # Pruned down to the entries still in the stream (a trimmed node or two).
        assert await raw.hlen(index) <= await raw.xlen(broker.stream_key("p")) + 2 * 10 + 256
        assert await raw.hlen(index) < 400
        recent = await broker.replay(["p"], "order-397")
        assert [d.id for d in recent.deliveries] == ["order-398", "order-399"]
        assert (await broker.replay(["p"], "order-3")).reset in ("unknown_id", "history_exceeded")
    finally:
        await raw.aclose()
        await broker.close()


async def test_errors_do_not_show_the_password_of_the_url() -> None:
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there
    broker = RedisBroker(f"redis://app:s3cret@127.0.0.1:{port}/0", retries=0)
    try:
        with pytest.raises(BrokerUnavailableError) as failed:
            await broker.publish("c", ServerSentEvent(data="x"))
        assert failed.value.published is False
        assert "s3cret" not in str(failed.value)
        assert f"redis://app:***@127.0.0.1:{port}/0" in str(failed.value)
    finally:
        await broker.close()


@pytest.mark.timeout(60)
async def test_a_broker_outage_is_logged_once_with_summaries_not_per_stream(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue "Ready for PyPI": while Redis was down every turned-away stream
    # logged a ~60-line traceback.
    broker = RedisBroker(redis_server.url, block=0.3, max_backoff=0.2, timeout=0.5, retries=0)
    handler = ServerSentEventHandler(broker=broker, reconnect_retry=(1000, 2000))
    handler.broker_outage.summary_every = 0.3
    caplog.set_level(logging.WARNING)
    async with serve([handler.route("/events")], handler) as server:
        watcher = await server.stream("/events?channel=watched")
        await wait_until(lambda: len(handler.subscribers("watched")) == 1)
        redis_server.kill()
        loop = asyncio.get_running_loop()
        turned_away = 0
        deadline = loop.time() + 20

        def summaries() -> int:
            return sum("still unavailable" in r.getMessage() for r in caplog.records)

        while turned_away < 20 or summaries() == 0:
            assert loop.time() < deadline
            client = await server.stream(f"/events?channel=user{turned_away}")
            with pytest.raises(StreamEnded):
                await client.next_event(timeout=10)
            assert client.parser.retry is not None  # a retry hint, then the close
            client.close()
            turned_away += 1
        redis_server.start()
        back = await server.stream("/events?channel=after")
        await wait_until(lambda: len(handler.subscribers("after")) == 1, timeout=10)
        await wait_until(lambda: broker.reader_healthy, timeout=10)
        back.close()
        watcher.close()
    await broker.close()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sse_handler")]
    # The reader, retrying every 0.2 s meanwhile, said it once too.
    assert sum("reader of" in m and "lost Redis" in m for m in messages) == 1
    assert sum("reader of" in m and "is back" in m for m in messages) == 1
    assert sum("the broker is unavailable" in m for m in messages) == 1
    assert summaries() >= 1
    assert sum("the broker is back" in m for m in messages) == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_concurrent_subscribes_of_one_group_read_its_sequence_once(
    redis_server: RedisServer,
) -> None:
    """Each new channel's subscribe reads its group's last id (the floor of a
    later catch-up); 500 channels subscribed at once (a burst of streams on
    channels of their own) share the reads in flight instead of sending 500."""
    broker = RedisBroker(redis_server.url, block=0.5)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await broker.subscribe("first")  # the reader and its connection in place

        async def hget_calls() -> int:
            stats = await raw.info("commandstats")
            return int(stats.get("cmdstat_hget", {}).get("calls", 0))

        before = await hget_calls()
        await asyncio.gather(*(broker.subscribe(f"own-{n}") for n in range(500)))
        read = await hget_calls() - before
        assert read <= 20, read
        # And each still gets what is published to it from now on.
        got: list[Delivery] = []
        broker.add_listener(got.append)
        ids = [await broker.publish(f"own-{n}", ServerSentEvent(data=str(n))) for n in (0, 499)]
        await wait_until(lambda: len(got) == 2)
        assert [d.id for d in got] == ids
    finally:
        await raw.aclose()
        await broker.close()
