"""Deployment-wide operations and presence over a real Redis: handlers of
separate planes in this process (each plane is one "process"), and demo
processes with the admin API asked through a fourth one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis import asyncio as aioredis
from redis_server import RedisServer
from support import DemoProcess, serve, wait_until
from test_cluster import SubjectHandler
from test_metrics import scrape

from sse_handler import BrokerUnavailableError, ServerSentEvent
from sse_handler.brokers.redis import RedisBroker
from sse_handler.brokers.redis_control import RedisControlPlane
from sse_handler.cluster import PresenceEntry, SubjectPresence
from sse_handler.metrics import register_cluster_metrics
from sse_handler.parser import MessageEvent
from sse_handler.testing import EventStreamClient

TOKEN = "t0ken"
AUTH = {"Authorization": "Bearer " + TOKEN}
#: The presence bound the tests run with (seconds; the default is 15).
TTL = 1.5


def handler_on(url: str, **settings: Any) -> SubjectHandler:
    broker = RedisBroker(url, block=0.5)
    plane = RedisControlPlane.for_broker(broker, presence_ttl=TTL, timeout=1.0, **settings)
    return SubjectHandler(broker=broker, cluster=plane)


def plane_of(handler: SubjectHandler) -> RedisControlPlane:
    assert isinstance(handler.cluster, RedisControlPlane)
    return handler.cluster


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Await ``check()`` until it holds; the seconds that took. Fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)
    return loop.time() - start


async def test_operations_reach_the_other_process(redis_server: RedisServer) -> None:
    a, b = handler_on(redis_server.url), handler_on(redis_server.url)
    pa, pb = plane_of(a), plane_of(b)
    assert pa.process != pb.process
    # As a server does before it serves (the demo does): each plane beats and
    # listens before its first stream, so a request reaches the other at once.
    # Without it a plane starts with its first tracked stream, and a request
    # sent before its first heartbeat lands does not count it among the live.
    await asyncio.gather(pa.start(), pb.start())
    async with serve([a.route("/a")], a) as sa, serve([b.route("/b")], b) as sb:
        on_a = await sa.stream("/a?channel=room&subject=alice")
        tabs = [
            await sb.stream("/b?channel=room&subject=alice"),
            await sb.stream("/b?channel=room&subject=alice"),
        ]
        bob = await sb.stream("/b?channel=room&subject=bob")
        await wait_until(lambda: len(a) == 1 and len(b) == 3)

        listing = await pa.connections()
        assert sorted((c.subject, c.process) for c in listing) == sorted(
            [
                ("alice", pa.process),
                ("alice", pb.process),
                ("alice", pb.process),
                ("bob", pb.process),
            ]
        )
        [bob_cid] = [c.cid for c in listing if c.subject == "bob"]
        assert (await pa.connection(bob_cid)) == next(c for c in listing if c.cid == bob_cid)
        assert await pa.connection("nosuchcid") is None

        assert await pa.send_one(bob_cid, event="note", data="across") is True
        assert await bob.next_event() == MessageEvent(data="across", event="note")
        assert await pa.send_one("nosuchcid", data="x") is False

        # Presence, with its roll-up, seen from either process.
        async def everyone_present() -> bool:
            return len(await pa.presence("room")) == 4

        assert await eventually(everyone_present, 1.0) < 1.0
        entries = await pb.presence("room")
        assert entries == await pa.presence("room")
        since = {e.cid: e.since for e in entries}
        assert since[bob_cid] == b.get_connection(bob_cid).connected_at
        alice = next(s for s in await pa.subjects("room") if s.subject == "alice")
        assert (alice.connections, alice.processes) == (3, sorted([pa.process, pb.process]))
        assert await pa.subjects("room") == [
            alice,
            SubjectPresence("bob", 1, [pb.process], since[bob_cid]),
        ]

        assert await pa.stop_one(bob_cid, ServerSentEvent(event="bye", data=""), 9000) is True
        assert await bob.wait_closed() == [MessageEvent(data="", event="bye")]
        assert bytes(bob.raw).endswith(b"retry: 9000\n\nevent: bye\ndata: \n\n")
        assert await pa.stop_one(bob_cid) is False

        assert await pb.stop_subject("alice") == 3
        for client in (on_a, *tabs):
            await client.wait_closed()

        async def nobody_present() -> bool:
            return await pb.presence("room") == []

        assert await eventually(nobody_present, 1.0) < 1.0
        assert pb.served["stop_subject"] == 0 and pa.served["stop_subject"] == 1
        assert pa.unanswered == pb.unanswered == 0
        registry = CollectorRegistry()
        register_cluster_metrics(pa, registry)
        values = scrape(registry)
        assert values[("sse_cluster_processes", ())] == 2
        assert values[("sse_cluster_requests_served_total", (("operation", "stop_subject"),))] == 1
        assert values[("sse_cluster_operations_total", (("operation", "send"),))] == 2
    # A clean shutdown takes the process out at once.
    assert pa.closed and pb.closed
    reader = RedisControlPlane(redis_server.url)
    try:
        assert await reader.ask_others("list", {}, first_found=False) == []
        assert reader.live_processes == [reader.process]  # only the one asking
    finally:
        await reader.close()
    for handler in (a, b):
        assert handler.broker is not None
        await handler.broker.close()


async def test_presence_events_cross_processes(redis_server: RedisServer) -> None:
    a = handler_on(redis_server.url, presence_events=True)
    b = handler_on(redis_server.url, presence_events=True)
    async with serve([a.route("/a")], a) as sa, serve([b.route("/b")], b) as sb:
        watcher = await sa.stream("/a?channel=room&subject=watcher")
        assert json.loads((await watcher.next_event()).data)["subject"] == "watcher"
        visitor = await sb.stream("/b?channel=room&subject=visitor")
        joined = json.loads((await watcher.next_event()).data)
        assert (joined["action"], joined["subject"], joined["process"]) == (
            "join",
            "visitor",
            plane_of(b).process,
        )
        visitor.close()
        left = json.loads((await watcher.next_event()).data)
        assert (left["action"], left["cid"]) == ("leave", joined["cid"])
        watcher.close()
    for handler in (a, b):
        assert handler.broker is not None
        await handler.broker.close()


async def test_a_process_that_does_not_answer_is_waited_for_only_until_the_timeout(
    redis_server: RedisServer,
) -> None:
    a = handler_on(redis_server.url)
    pa = plane_of(a)
    client = aioredis.Redis.from_url(redis_server.url)
    async with serve([a.route("/a")], a) as sa:
        on_a = await sa.stream("/a?subject=alice")
        await wait_until(lambda: len(a) == 1)
        # A heartbeat of a process that hangs: live, but it never answers.
        seconds, micros = await client.time()
        await client.zadd("sse:h:", {"hung": seconds * 1000 + micros // 1000})
        loop = asyncio.get_running_loop()
        start = loop.time()
        listing = await pa.connections()
        waited = loop.time() - start
        assert [c.subject for c in listing] == ["alice"]
        assert pa.timeout <= waited < pa.timeout + 0.5
        assert pa.unanswered == 1
        # Once its heartbeat is older than the TTL it is not waited for.
        await asyncio.sleep(TTL)  # the documented expiry bound
        start = loop.time()
        assert [c.subject for c in await pa.connections()] == ["alice"]
        assert loop.time() - start < 0.5
        assert pa.unanswered == 1
        assert "hung" not in pa.live_processes
        on_a.close()
    await client.aclose()
    assert a.broker is not None
    await a.broker.close()


# --- demo processes, the admin API asked through a fourth one --------------------------


async def admin_json(demo: DemoProcess, path: str, method: str = "GET") -> tuple[int, Any]:
    response = await demo.fetch(path, method=method, headers=AUTH)
    return response.code, json.loads(response.body) if response.body else None


async def open_stream(demo: DemoProcess, query: str) -> tuple[EventStreamClient, str]:
    client = await EventStreamClient.connect(demo.url + "/events?" + query)
    welcome = await client.next_event()
    return client, json.loads(welcome.data)["connection_id"]


@pytest.mark.timeout(120)
async def test_admin_api_over_three_demo_processes(redis_server: RedisServer) -> None:
    args = ("--redis", redis_server.url, "--admin-token", TOKEN, "--presence-ttl", str(TTL))
    procs = [DemoProcess(*args) for _ in range(4)]
    await asyncio.gather(*(p.start() for p in procs))
    admin = procs[3]  # no clients: every operation asks the others
    try:
        alice1, alice1_cid = await open_stream(procs[0], "channel=room&subject=alice")
        bob, bob_cid = await open_stream(procs[1], "channel=room&subject=bob")
        alice2, alice2_cid = await open_stream(procs[2], "channel=room&subject=alice")

        status, listing = await admin_json(admin, "/admin/connections")
        assert status == 200
        by_cid = {c["cid"]: c for c in listing}
        assert set(by_cid) == {alice1_cid, bob_cid, alice2_cid}
        assert len({c["process"] for c in listing}) == 3
        assert by_cid[bob_cid]["subject"] == "bob"
        assert by_cid[bob_cid]["channels"] == ["room"]
        assert by_cid[bob_cid]["events_sent"] == 1  # the welcome
        status, one = await admin_json(admin, f"/admin/connections/{bob_cid}")
        assert (status, one["process"]) == (200, by_cid[bob_cid]["process"])

        def present(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                _, body = await admin_json(admin, "/admin/presence/room")
                return len(body["connections"]) == count

            return check

        assert await eventually(present(3), 1.0) < 1.0
        _, body = await admin_json(admin, "/admin/presence/room")
        assert [(s["subject"], s["connections"]) for s in body["subjects"]] == [
            ("alice", 2),
            ("bob", 1),
        ]

        # Stop a client of another process: its farewell, then the end.
        status, _ = await admin_json(admin, f"/admin/connections/{bob_cid}", "DELETE")
        assert status == 204
        assert await bob.wait_closed() == [MessageEvent(data="", event="close")]
        status, body = await admin_json(admin, f"/admin/connections/{bob_cid}", "DELETE")
        assert status == 404 and bob_cid in body["error"]
        assert await eventually(present(2), 1.0) < 1.0

        # Stop a subject: its streams on every process.
        status, body = await admin_json(admin, "/admin/subjects/alice", "DELETE")
        assert (status, body) == (200, {"stopped": 2})
        for client in (alice1, alice2):
            assert await client.wait_closed() == [MessageEvent(data="", event="close")]
        assert await eventually(present(0), 1.0) < 1.0

        # A process killed without a goodbye leaves presence within the TTL.
        carol, _ = await open_stream(procs[2], "channel=room&subject=carol")
        assert await eventually(present(1), 1.0) < 1.0
        assert procs[2].proc is not None
        procs[2].proc.kill()
        await procs[2].proc.wait()
        assert await eventually(present(0), TTL + 1.0) <= TTL + 0.5
        loop = asyncio.get_running_loop()
        start = loop.time()
        status, listing = await admin_json(admin, "/admin/connections")
        assert (status, listing) == (200, [])
        assert loop.time() - start < 1.0  # the dead process is not waited for
        carol.close()
    finally:
        codes = await asyncio.gather(*(p.stop() for p in procs))
    assert codes[:2] == [0, 0] and codes[3] == 0


@pytest.mark.timeout(60)
async def test_presence_survives_a_redis_restart_and_changes_made_meanwhile(
    redis_server: RedisServer,
) -> None:
    a = handler_on(redis_server.url)
    pa = plane_of(a)
    async with serve([a.route("/a")], a) as sa:
        leaving = await sa.stream("/a?channel=room&subject=leaving")
        staying = await sa.stream("/a?channel=room&subject=staying")

        async def subjects_present(expected: list[str]) -> bool:
            try:
                return sorted(e.subject or "" for e in await pa.presence("room")) == expected
            except BrokerUnavailableError:
                return False

        await eventually(lambda: subjects_present(["leaving", "staying"]), 1.0)
        client = aioredis.Redis.from_url(redis_server.url)
        # The channel's hash expires by itself unless heartbeats renew it.
        assert 0 < await client.pttl("sse:r:room") <= 2 * TTL * 1000
        await client.aclose()

        redis_server.kill()
        leaving.close()
        await wait_until(lambda: len(a) == 1)
        with pytest.raises(BrokerUnavailableError):
            await pa.presence("room")
        redis_server.start()  # without its data: heartbeats write presence again
        await eventually(lambda: subjects_present(["staying"]), 2 * TTL)
        staying.close()
    assert a.broker is not None
    await a.broker.close()


async def test_a_burst_of_joins_and_leaves_is_seen_whole_from_another_process(
    redis_server: RedisServer,
) -> None:
    """The presence writer groups a batch by channel (one HSET and one PEXPIRE
    per channel): every join and leave of a burst still reaches the roster."""
    a = handler_on(redis_server.url)
    b = handler_on(redis_server.url)
    await asyncio.gather(plane_of(a).start(), plane_of(b).start())
    async with serve([a.route("/a")], a) as sa:
        room = await asyncio.gather(
            *(sa.stream(f"/a?channel=room&subject=u{i}") for i in range(20))
        )
        own = await asyncio.gather(*(sa.stream(f"/a?channel=own-{i}") for i in range(10)))
        await wait_until(lambda: len(a) == 30)

        def cids(channel: str) -> set[str]:
            return {c.cid for c in a.connections() if channel in c.channels}

        async def seen_from_b(channel: str, wanted: set[str]) -> bool:
            return {e.cid for e in await plane_of(b).presence(channel)} == wanted

        await eventually(lambda: seen_from_b("room", cids("room")), 10)
        for i in range(10):
            channel = f"own-{i}"
            await eventually(lambda c=channel: seen_from_b(c, cids(c)), 10)  # type: ignore[misc]
        async with aioredis.Redis.from_url(redis_server.url) as raw:
            keys = [k async for k in raw.scan_iter(match="*r:room")]
            assert len(keys) == 1
            assert 0 < await raw.pttl(keys[0]) <= int(TTL * 2000)
        for client in room[:10]:
            client.close()
        await wait_until(lambda: len(a) == 20)
        assert len(cids("room")) == 10
        await eventually(lambda: seen_from_b("room", cids("room")), 10)
        for client in [*room[10:], *own]:
            client.close()
    for handler in (a, b):
        await handler.cluster.close()
        assert handler.broker is not None
        await handler.broker.close()


async def test_a_batch_of_presence_changes_is_written_whole(redis_server: RedisServer) -> None:
    """The writer sends a batch in one script call per 64 channels: thousands
    of joins to one channel (set in chunks), joins and leaves mixed in one
    channel, and many channels of one join each all land; a roster with
    joins gets the TTL, one with only leaves keeps its own."""
    plane = RedisControlPlane(redis_server.url, prefix="batch:", presence_ttl=TTL, timeout=1.0)
    await plane.start()
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:

        def entry(cid: str) -> PresenceEntry:
            return PresenceEntry(cid, None, plane.process, 1.0)

        for n in range(6):
            plane.stored_join("mixed", entry(f"old{n}"))
        plane.stored_join("leaving", entry("gone"))
        plane.stored_join("leaving", entry("stays"))
        await eventually(lambda: _hlen(raw, "mixed", 6), 5)
        await eventually(lambda: _hlen(raw, "leaving", 2), 5)
        await raw.persist(_roster(plane, "leaving"))
        for n in range(2500):
            plane.stored_join("big", entry(f"c{n}"))
        for n in range(3):
            plane.stored_leave("mixed", entry(f"old{n}"))
            plane.stored_join("mixed", entry(f"new{n}"))
        plane.stored_leave("leaving", entry("gone"))
        for n in range(150):
            plane.stored_join(f"own-{n}", entry(f"u{n}"))
        await eventually(lambda: _hlen(raw, "own-149", 1), 5)
        await eventually(lambda: _hlen(raw, "big", 2500), 5)
        mixed = await raw.hgetall(_roster(plane, "mixed"))
        assert sorted(name.split(" ")[1] for name in mixed) == [
            "new0", "new1", "new2", "old3", "old4", "old5"
        ]  # fmt: skip
        assert json.loads(next(iter(mixed.values()))) == {"subject": None, "since": 1.0}
        assert await raw.hlen(_roster(plane, "leaving")) == 1
        assert await raw.pttl(_roster(plane, "leaving")) == -1  # only a leave: no TTL set
        for channel in ("big", "mixed", "own-0", "own-149"):
            assert 0 < await raw.pttl(_roster(plane, channel)) <= int(TTL * 2000)
        assert {e.cid for e in await plane.presence("own-7")} == {"u7"}
    finally:
        await raw.aclose()
        await plane.close()


def _roster(plane: RedisControlPlane, channel: str) -> str:
    return plane._roster_key(channel)


async def _hlen(raw: Any, key_or_channel: str, wanted: int) -> bool:
    keys = [k async for k in raw.scan_iter(match=f"batch:*{key_or_channel}*")]
    return bool(keys) and await raw.hlen(keys[0]) == wanted


async def test_a_request_that_reaches_a_process_twice_runs_once(
    redis_server: RedisServer,
) -> None:
    """redis-py sends a command again when its connection broke after the
    command went out: a request may be published twice. Each process runs
    it once."""
    a, b = handler_on(redis_server.url), handler_on(redis_server.url)
    pa, pb = plane_of(a), plane_of(b)
    await asyncio.gather(pa.start(), pb.start())
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        async with serve([b.route("/b")], b) as sb:
            bob = await sb.stream("/b?channel=room&subject=bob")
            await wait_until(lambda: len(b) == 1)
            [cid] = [c.cid for c in await pa.connections()]
            frame = ServerSentEvent(event="note", data="once").encode().decode()
            request = {"id": "r1", "from": pa.process, "op": "send"}
            request["args"] = {"cid": cid, "frame": frame}
            for _ in range(2):  # the same request, published twice
                await raw.publish(f"{pa.prefix}q:", json.dumps(request))
            assert await pa.send_one(cid, event="note", data="then this") is True
            assert await bob.next_event() == MessageEvent(data="once", event="note")
            assert await bob.next_event() == MessageEvent(data="then this", event="note")
            assert pb.served["send"] == 2
            bob.close()
    finally:
        await raw.aclose()
        await pa.close()  # not served, so not shut down with a server
        for handler in (a, b):
            assert handler.broker is not None
            await handler.broker.close()
