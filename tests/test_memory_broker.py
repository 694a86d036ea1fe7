"""The MemoryBroker under hostile ids, big histories and channel churn.

Hostile Last-Event-ID values get a reset, never a traceback or a wrong
replay; a lookup costs O(log n) per channel of the client, not a scan of the
history; channels that nobody reads and whose history is gone are forgotten,
so one-shot channels cannot grow the process without bound.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import time
import tracemalloc
from collections.abc import Coroutine
from typing import Any, TypeVar, cast
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import serve, wait_until

from sse_handler import MemoryBroker, ServerSentEvent, ServerSentEventHandler
from sse_handler.testing import EventStreamClient

T = TypeVar("T")


def _hostile_ids(epoch: str) -> list[str]:
    huge = "9" * (sys.get_int_max_str_digits() + 10)
    return [
        # Not of this broker's form at all.
        "18446744073709551616-0",
        "²-0",
        "1-¹",
        "-1",
        "0x10-0",
        " 5-1",
        "5-1 ",
        "other-5",
        "-",
        "--",
        "x-",
        "-x",
        huge,
        f"{huge}-{huge}",
        # This broker's epoch, then something that is not a sequence number
        # it assigned: int(..., 36) takes all of these, and must not.
        f"{epoch}-",
        f"{epoch}--1",
        f"{epoch}-+1",
        f"{epoch}- 5",
        f"{epoch}-1_0",
        f"{epoch}-Z",
        f"{epoch}-00001",
        f"{epoch}-0",
        f"{epoch}-0x10",
        f"{epoch}-²",
        f"{epoch}-¹",
        f"{epoch}-\uff11",  # FULLWIDTH DIGIT ONE
        f"{epoch}-\u0663",  # ARABIC-INDIC DIGIT THREE
        f"{epoch}-{huge}",
        f"{epoch}-zzzzzzzzzzzzzzzzzzzz",
        f"{epoch}-{epoch}-1",
        f"{epoch[:-1]}-1",
        f"{epoch}x-1",
    ]


def _resume_path(last_event_id: str) -> tuple[str, dict[str, str]]:
    """The header when the id fits in latin-1 (as HTTP carries it), else the
    ``last_event_id`` query parameter, UTF-8 and percent-encoded."""
    try:
        last_event_id.encode("latin-1")
    except UnicodeEncodeError:
        return f"/events?channel=c&last_event_id={quote(last_event_id)}", {}
    return "/events?channel=c", {"Last-Event-ID": last_event_id}


async def test_hostile_last_event_ids_get_a_reset_never_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker(history_size=20)
    # A limit this high lets the longest ids reach the broker's lookup.
    handler = ServerSentEventHandler(broker=broker, max_last_event_id=100_000)
    clients: list[EventStreamClient] = []
    async with serve([handler.route("/events")], handler) as server:
        try:
            ids = [await handler.publish("c", data=str(i)) for i in range(40)]
            hostile = _hostile_ids(broker.epoch)
            wrong: list[tuple[str, str, str]] = []
            with caplog.at_level(logging.WARNING):
                for last_event_id in hostile:
                    path, headers = _resume_path(last_event_id)
                    client = await server.stream(path, headers)
                    clients.append(client)
                    first = await client.next_event()
                    got = json.loads(first.data) if first.event == "reset" else first.data
                    if (first.event, got) != ("reset", {"reason": "unknown_id"}):
                        wrong.append((last_event_id[:40], first.event, first.data))
                assert wrong == [], "\n".join(map(repr, wrong))
                # Ids it did assign still resume exactly, or are too old.
                exact = await server.stream("/events?channel=c", {"Last-Event-ID": ids[37]})
                clients.append(exact)
                assert [e.data for e in await exact.events(2)] == ["38", "39"]
                old = await server.stream("/events?channel=c", {"Last-Event-ID": ids[5]})
                clients.append(old)
                reset = await old.next_event()
                assert json.loads(reset.data) == {"reason": "history_exceeded"}
                # Every stream is open and live after its reset.
                await wait_until(lambda: len(handler.subscribers("c")) == len(clients))
                await handler.publish("c", data="live")
                for client in clients:
                    assert (await client.next_event()).data == "live"
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert errors == []
            assert handler.stats().resets == {"unknown_id": len(hostile), "history_exceeded": 1}
            for last_event_id in hostile:
                assert broker.position(last_event_id) is None, last_event_id
        finally:
            for client in clients:
                client.close()


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (the MemoryBroker's calls) to its end."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    raise AssertionError("the coroutine suspended")


@given(st.data())
def test_any_id_gets_an_exact_replay_or_a_reset(data: st.DataObject) -> None:
    broker = MemoryBroker(history_size=5)
    ids = [_run(broker.publish("c", ServerSentEvent(data=str(i)))) for i in range(8)]
    tail = st.text() | st.text("0123456789abcdefxyzZ_+- \u00b2\uff11", max_size=15)
    last_event_id = data.draw(st.sampled_from(ids) | tail | tail.map(f"{broker.epoch}-".__add__))
    position = broker.position(last_event_id)
    replay = _run(broker.replay(["c"], last_event_id))
    if position is None:
        assert replay.reset == "unknown_id"
        return
    assert last_event_id in ids
    assert 1 <= position <= 8
    if position < 3:  # events 1..3 were trimmed
        assert replay.reset == "history_exceeded"
    else:
        assert replay.reset is None
        assert [d.id for d in replay.deliveries] == ids[position:]


async def test_hostile_ids_of_a_caller_are_looked_up_by_value() -> None:
    """An id the publisher chose may look like anything, hostile ones included:
    it resumes while in the history, as given."""
    broker = MemoryBroker()
    await broker.publish("c", ServerSentEvent(data="a", id="²-0"))
    after = await broker.publish("c", ServerSentEvent(data="b"))
    replay = await broker.replay(["c"], "²-0")
    assert replay.reset is None
    assert [d.id for d in replay.deliveries] == [after]


@pytest.mark.timeout(180)
async def test_replay_lookups_are_bounded_with_1000_channels_of_1000_events() -> None:
    broker = MemoryBroker(history_size=1000)
    event = ServerSentEvent(data="x")
    names = [f"c{n}" for n in range(1000)]
    first: dict[str, str] = {}
    newest = ""
    for _ in range(1000):
        for name in names:
            newest = await broker.publish(name, event)
            first.setdefault(name, newest)
    assert len(broker._channels) == 1000

    async def timed(channels: list[str], last_event_id: str) -> tuple[float, int, str | None]:
        # The best of three: a lookup's cost, not a GC pause that hit it.
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            replay = await broker.replay(channels, last_event_id)
            best = min(best, time.perf_counter() - start)
        return best, len(replay.deliveries), replay.reset

    # An id that is no entry of any channel: unknown, without a scan.
    elapsed, count, reset = await timed(names, "not-an-entry")
    assert (count, reset) == (0, "unknown_id")
    assert elapsed < 0.020, f"{elapsed * 1000:.1f} ms for a non-entry id"
    # Another broker's (a restart's) id.
    elapsed, count, reset = await timed(names, "zz0000000-5")
    assert (count, reset) == (0, "unknown_id")
    assert elapsed < 0.020, f"{elapsed * 1000:.1f} ms for another epoch's id"
    # The newest id over every channel: nothing missed, found by bisection.
    elapsed, count, reset = await timed(names, newest)
    assert (count, reset) == (0, None)
    assert elapsed < 0.020, f"{elapsed * 1000:.1f} ms for the newest id"
    # An old id on a client with one channel: the channel's 999 later events.
    elapsed, count, reset = await timed(["c5"], first["c5"])
    assert (count, reset) == (999, None)
    assert elapsed < 0.020, f"{elapsed * 1000:.1f} ms for an old id on one channel"
    replay = await broker.replay(["c5"], first["c5"])
    positions = [d.position for d in replay.deliveries]
    assert positions == sorted(positions) and positions[0] > broker.position(first["c5"])
    assert {d.channel for d in replay.deliveries} == {"c5"}
    # A caller-chosen id, newest in its channel: found without a scan.
    await broker.publish("c7", ServerSentEvent(data="y", id="order-17"))
    elapsed, count, reset = await timed(names, "order-17")
    assert (count, reset) == (0, None)
    assert elapsed < 0.020, f"{elapsed * 1000:.1f} ms for a caller's id"


@pytest.mark.timeout(120)
async def test_one_shot_channels_keep_bounded_memory() -> None:
    gc.collect()
    tracemalloc.start()
    try:
        broker = MemoryBroker()  # max_channels: 10,000
        event = ServerSentEvent(data="one shot")
        for n in range(100_000):
            await broker.publish(f"one-shot-{n}", event)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(broker._channels) == 10_000
    # Before channels were forgotten: 115 MiB, all 100,000 kept.
    assert held < 16 * 2**20, f"{held / 2**20:.1f} MiB held"


async def test_a_client_resuming_on_an_evicted_channel_gets_a_reset() -> None:
    broker = MemoryBroker(max_channels=100)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        kept_id = await handler.publish("kept", data="k1")
        evicted_id = await handler.publish("evicted", data="e1")
        await handler.publish("evicted", data="e2")
        await handler.publish("kept", data="k2")
        for n in range(150):
            await handler.publish(f"one-shot-{n}", data="x")
            if n % 50 == 0:
                await handler.publish("kept", data=f"k{3 + n}")  # recently published: kept
        assert len(broker._channels) == 100
        assert "kept" in broker._channels and "evicted" not in broker._channels
        resumed = await server.stream("/events?channel=evicted", {"Last-Event-ID": evicted_id})
        reset = await resumed.next_event()
        assert (reset.event, json.loads(reset.data)) == ("reset", {"reason": "history_exceeded"})
        exact = await server.stream("/events?channel=kept", {"Last-Event-ID": kept_id})
        assert [e.data for e in await exact.events(4)] == ["k2", "k3", "k53", "k103"]
        # The channel comes back when published again; an id from before the
        # eviction still gets the reset, not the new events alone.
        await handler.publish("evicted", data="e3")
        again = await server.stream("/events?channel=evicted", {"Last-Event-ID": evicted_id})
        reset = await again.next_event()
        assert json.loads(reset.data) == {"reason": "history_exceeded"}
        for client in (resumed, exact, again):
            client.close()


async def test_channels_whose_history_expired_are_swept() -> None:
    age = 0.2
    broker = MemoryBroker(history_age=age)
    handler = ServerSentEventHandler(broker=broker)
    async with serve([handler.route("/events")], handler) as server:
        reader = await server.stream("/events?channel=read")
        await wait_until(lambda: len(handler.subscribers("read")) == 1)
        read_id = await handler.publish("read", data="r")
        gone = [await handler.publish(f"one-shot-{n}", data="x") for n in range(1000)]
        assert (await reader.next_event()).data == "r"
        assert len(broker._channels) == 1001
        await asyncio.sleep(age * 1.5)  # the age bound passing is what is tested
        # Sweeping runs from publish, a bounded number of channels at a time.
        for n in range(200):
            await handler.publish("tick", data=str(n))
        # The channel with a local subscriber stays; the expired others go.
        assert set(broker._channels) == {"read", "tick"}
        # one-shot-7 had an event after gone[6]: forgotten, so a reset.
        resumed = await server.stream("/events?channel=one-shot-7", {"Last-Event-ID": gone[6]})
        reset = await resumed.next_event()
        assert json.loads(reset.data) == {"reason": "history_exceeded"}
        again = await server.stream("/events?channel=read", {"Last-Event-ID": read_id})
        await wait_until(lambda: len(handler.subscribers("read")) == 2)
        await handler.publish("read", data="r2")
        assert (await again.next_event()).data == "r2"
        for client in (reader, resumed, again):
            client.close()


def test_max_channels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_channels"):
        MemoryBroker(max_channels=0)


async def test_published_frame_is_the_id_line_then_the_event() -> None:
    # docs/wire-format.md: a broker-assigned id goes first, before the event's
    # own fields (comment included); a caller's id stays where encode() puts it.
    broker = MemoryBroker()
    got: list[bytes] = []
    broker.add_listener(lambda delivery: got.append(delivery.frame))
    await broker.subscribe("c")
    event = ServerSentEvent(data="d", event="e", comment="c")
    assigned = await broker.publish("c", event)
    await broker.publish("c", ServerSentEvent(data="d", event="e", id="mine", comment="c"))
    assert got == [
        b"id: " + assigned.encode() + b"\n: c\nevent: e\ndata: d\n\n",
        b": c\nevent: e\nid: mine\ndata: d\n\n",
    ]
    await broker.close()
