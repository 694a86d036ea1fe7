"""Channels, publish and Last-Event-ID replay with the embedded MemoryBroker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection

from support import serve, wait_until
from tornado.httputil import HTTPServerRequest

from sse_handler import (
    MemoryBroker,
    ServerSentEvent,
    ServerSentEventConnection,
    ServerSentEventHandler,
)


async def test_publish_reaches_only_the_channel_subscribers() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        news = await server.stream("/events?channel=news")
        sport = await server.stream("/events?channel=sport")
        both = await server.stream("/events?channel=news&channel=sport")
        plain = await server.stream("/events")
        await wait_until(lambda: len(handler) == 4)
        first = await handler.publish("news", data="n1")
        await handler.publish("sport", data="s1")
        await handler.publish("default", data="d1")
        assert (await news.next_event()).data == "n1"
        assert (await sport.next_event()).data == "s1"
        assert [e.data for e in await both.events(2)] == ["n1", "s1"]
        assert (await plain.next_event()).data == "d1"
        assert handler.get_connection(handler.connection_ids()[2]).channels == {"news", "sport"}
        # Ids are the broker's: short ASCII, monotonic.
        assert first.isascii() and len(first) < 20
        for client in (news, sport, both, plain):
            client.close()
        await wait_until(lambda: not handler.subscribers("news"))


async def test_channel_from_the_route_pattern() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route(r"/rooms/(?P<channel>[a-z]+)")], handler) as server:
        lobby = await server.stream("/rooms/lobby")
        await wait_until(lambda: len(handler.subscribers("lobby")) == 1)
        await handler.publish("lobby", data="hi")
        assert (await lobby.next_event()).data == "hi"
        lobby.close()


async def test_authorize_decides_the_channels() -> None:
    class Guarded(ServerSentEventHandler):
        def authorize(self, request: HTTPServerRequest) -> Collection[str] | None:
            asked = self.channels_for(request, {})
            return [c for c in asked if not c.startswith("secret")]

    handler = Guarded()
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream("/events?channel=public&channel=secret-admin")
        await wait_until(lambda: len(handler) == 1)
        assert handler.connections()[0].channels == {"public"}
        await handler.publish("secret-admin", data="leak")
        await handler.publish("public", data="ok")
        assert (await client.next_event()).data == "ok"
        # Replay is filtered the same way.
        cursor = await handler.publish("public", data="a")
        await handler.publish("secret-admin", data="leak again")
        await handler.publish("public", data="b")
        resumed = await server.stream(
            "/events?channel=public&channel=secret-admin", {"Last-Event-ID": cursor}
        )
        assert (await resumed.next_event()).data == "b"
        await handler.publish("public", data="c")
        assert (await resumed.next_event()).data == "c"
        assert b"leak" not in resumed.raw
        client.close()
        resumed.close()


async def test_registered_may_change_channels() -> None:
    class Picker(ServerSentEventConnection):
        async def registered(self) -> None:
            self.unsubscribe("default")
            await self.subscribe("picked")

    handler = ServerSentEventHandler(connection_class=Picker)
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream()
        await wait_until(lambda: len(handler.subscribers("picked")) == 1)
        await handler.publish("default", data="not for you")
        await handler.publish("picked", data="for you")
        assert (await client.next_event()).data == "for you"
        client.close()


async def test_resume_with_last_event_id_gets_exactly_what_was_missed() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        client = await server.stream("/events?channel=c")
        await wait_until(lambda: len(handler) == 1)
        ids = [await handler.publish("c", data=str(i)) for i in range(5)]
        got = await client.events(5)
        assert [e.id for e in got] == ids
        client.close()
        await wait_until(lambda: len(handler) == 0)
        missed = [await handler.publish("c", data=str(i)) for i in range(5, 8)]
        resumed = await server.stream("/events?channel=c", {"Last-Event-ID": ids[2]})
        events = await resumed.events(5)
        assert [e.data for e in events] == ["3", "4", "5", "6", "7"]
        assert [e.id for e in events[2:]] == missed
        # And live afterwards, without duplicates.
        await handler.publish("c", data="live")
        assert (await resumed.next_event()).data == "live"
        # The query parameter works for a first connect too.
        first = await server.stream(f"/events?channel=c&last_event_id={missed[-1]}")
        await handler.publish("c", data="after")
        assert (await first.next_event()).data == "live"
        assert (await first.next_event()).data == "after"
        resumed.close()
        first.close()


async def test_unknown_and_too_old_ids_get_a_reset_event() -> None:
    handler = ServerSentEventHandler(broker=MemoryBroker(history_size=3))
    async with serve([handler.route("/events")], handler) as server:
        ids = [await handler.publish("c", data=str(i)) for i in range(10)]
        old = await server.stream("/events?channel=c", {"Last-Event-ID": ids[1]})
        reset = await old.next_event()
        assert reset.event == "reset"
        assert json.loads(reset.data) == {"reason": "history_exceeded"}
        unknown = await server.stream("/events?channel=c", {"Last-Event-ID": "other-epoch-5"})
        reset = await unknown.next_event()
        assert json.loads(reset.data) == {"reason": "unknown_id"}
        # Live events follow the reset.
        await handler.publish("c", data="live")
        assert (await old.next_event()).data == "live"
        assert (await unknown.next_event()).data == "live"
        # The newest ids still in history resume normally.
        ok = await server.stream("/events?channel=c", {"Last-Event-ID": ids[7]})
        assert [e.data for e in await ok.events(3)] == ["8", "9", "live"]
        for client in (old, unknown, ok):
            client.close()


async def test_empty_last_event_id_is_no_cursor() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        await handler.publish("default", data="before")
        client = await server.stream(headers={"Last-Event-ID": ""})
        await wait_until(lambda: len(handler) == 1)
        assert handler.connections()[0].last_event_id is None
        await handler.publish("default", data="after")
        assert (await client.next_event()).data == "after"
        client.close()


async def test_history_age_bound() -> None:
    broker = MemoryBroker(history_size=100, history_age=0.2)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        first = await handler.publish("c", data="old")
        await handler.publish("c", data="old too")
        await asyncio.sleep(0.3)  # let the age bound pass: what is being tested
        client = await server.stream("/events?channel=c", {"Last-Event-ID": first})
        assert (await client.next_event()).event == "reset"
        client.close()


async def test_memory_broker_ids_from_another_epoch_are_unknown() -> None:
    before_restart, after_restart = MemoryBroker(), MemoryBroker()
    assert before_restart.epoch != after_restart.epoch
    old_id = await before_restart.publish("c", ServerSentEvent(data="x"))
    await after_restart.publish("c", ServerSentEvent(data="y"))
    assert before_restart.position(old_id) == 1
    assert after_restart.position(old_id) is None
    assert (await after_restart.replay(["c"], old_id)).reset == "unknown_id"


async def test_reconnect_to_the_same_process_keeps_the_channel_live() -> None:
    handler = ServerSentEventHandler()
    async with serve([handler.route("/events")], handler) as server:
        for round_ in range(20):
            client = await server.stream("/events?channel=hop")
            await wait_until(lambda: len(handler.subscribers("hop")) == 1)
            await handler.publish("hop", data=str(round_))
            assert (await client.next_event()).data == str(round_)
            client.abort()
            await wait_until(lambda: not handler.subscribers("hop"))
        # The process unsubscribed once its last subscriber left, and
        # subscribes again for the next one.
        client = await server.stream("/events?channel=hop")
        await wait_until(lambda: len(handler.subscribers("hop")) == 1)
        await handler.publish("hop", data="again")
        assert (await client.next_event()).data == "again"
        client.close()
