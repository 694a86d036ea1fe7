"""Deployment-wide operations and presence in one process (the memory broker's
plane), and the admin API over them: real handlers, real sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support import serve, wait_until
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httputil import HTTPServerRequest

from sse_handler import MemoryBroker, ServerSentEvent, ServerSentEventHandler
from sse_handler.admin import admin_routes
from sse_handler.cluster import ControlPlane, PresenceEntry, SubjectPresence, subject_of
from sse_handler.connection import ServerSentEventConnection
from sse_handler.parser import MessageEvent
from sse_handler.writer import Transport

TOKEN = "t0ken"
AUTH = {"Authorization": "Bearer " + TOKEN}


class SubjectHandler(ServerSentEventHandler):
    """Takes the subject from ``?subject=`` (what authentication sets in an application)."""

    def get_connection_impl(
        self,
        request: HTTPServerRequest,
        cid: str,
        transport: Transport,
        last_event_id: str | None,
    ) -> ServerSentEventConnection:
        conn = super().get_connection_impl(request, cid, transport, last_event_id)
        subject = request.query_arguments.get("subject")
        if subject:
            setattr(conn, "subject", subject[-1].decode())  # noqa: B010
        return conn


def two_handlers(**settings: Any) -> tuple[SubjectHandler, SubjectHandler, list[Any]]:
    broker = MemoryBroker()
    a = SubjectHandler(broker=broker, **settings)
    b = SubjectHandler(broker=broker, **settings)
    routes: list[Any] = [a.route("/a"), b.route("/b")]
    return a, b, routes


async def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> HTTPResponse:
    client = AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(
            url,
            method=method,
            headers=headers,
            raise_error=False,
            request_timeout=5,
            allow_nonstandard_methods=True,
        )
    finally:
        client.close()


async def test_handlers_of_one_broker_share_one_plane() -> None:
    a, b, _ = two_handlers()
    assert a.cluster is b.cluster
    assert type(a.cluster) is ControlPlane
    assert ServerSentEventHandler().cluster is not a.cluster


async def test_list_send_and_stop_reach_every_handler_of_the_process() -> None:
    a, b, routes = two_handlers()
    assert a.cluster is not None
    cluster = a.cluster
    async with serve(routes, a, b) as server:
        on_a = await server.stream("/a?channel=room&subject=alice")
        on_b = await server.stream("/b?subject=bob")
        await wait_until(lambda: len(a) == 1 == len(b))
        listing = await cluster.connections()
        assert {(c.cid, c.path, c.subject, c.process) for c in listing} == {
            (a.connection_ids()[0], "/a", "alice", cluster.process),
            (b.connection_ids()[0], "/b", "bob", cluster.process),
        }
        [bob] = [c for c in listing if c.subject == "bob"]
        assert bob.channels == ["default"] and bob.remote_ip == "127.0.0.1"
        assert await cluster.connection(bob.cid) == bob
        assert await cluster.connection("nosuchcid") is None

        assert await cluster.send_one(bob.cid, event="note", data="hi") is True
        assert await on_b.next_event() == MessageEvent(data="hi", event="note")
        assert await cluster.send_one("nosuchcid", data="x") is False

        farewell = ServerSentEvent(event="bye", data="")
        assert await cluster.stop_one(bob.cid, farewell, retry=7000) is True
        assert await on_b.wait_closed() == [MessageEvent(data="", event="bye")]
        assert bytes(on_b.raw).endswith(b"retry: 7000\n\nevent: bye\ndata: \n\n")
        assert await cluster.stop_one(bob.cid) is False  # gone
        assert cluster.operations["stop"] == 2
        on_a.close()


async def test_stop_subject_stops_its_streams_in_every_handler() -> None:
    a, b, routes = two_handlers()
    assert a.cluster is not None
    async with serve(routes, a, b) as server:
        tabs = [
            await server.stream("/a?subject=alice"),
            await server.stream("/b?subject=alice"),
        ]
        other = await server.stream("/b?subject=bob")
        await wait_until(lambda: len(a) + len(b) == 3)
        assert await a.cluster.stop_subject("alice", ServerSentEvent(event="close", data="")) == 2
        for tab in tabs:
            assert await tab.wait_closed() == [MessageEvent(data="", event="close")]
        assert await a.cluster.stop_subject("alice") == 0
        assert [subject_of(c) for c in b.connections()] == ["bob"]
        assert await a.cluster.send_one(b.connection_ids()[0], data="still here")
        assert (await other.next_event()).data == "still here"
        other.close()


async def test_presence_follows_connects_subscriptions_and_disconnects() -> None:
    class Joining(ServerSentEventConnection):
        async def registered(self) -> None:
            await self.subscribe("lobby")

    a, b, routes = two_handlers()
    b.connection_class = Joining
    assert a.cluster is not None
    cluster = a.cluster
    async with serve(routes, a, b) as server:
        assert await cluster.presence("room") == []
        alice = await server.stream("/a?channel=room&subject=alice")
        bob = await server.stream("/b?channel=room&subject=bob")
        alice_tab = await server.stream("/b?channel=room&subject=alice")
        anonymous = await server.stream("/a?channel=room")
        await wait_until(lambda: cluster.presence_count() == 6)  # 4 in room, 2 in lobby
        entries = await cluster.presence("room")
        assert [(e.subject, e.process) for e in entries] == [
            ("alice", cluster.process),
            ("bob", cluster.process),
            ("alice", cluster.process),
            (None, cluster.process),
        ]
        assert entries[0].cid == a.connection_ids()[0]
        assert entries[0].since == a.connections()[0].connected_at
        lobby = await cluster.presence("lobby")
        assert [e.subject for e in lobby] == ["bob", "alice"]  # subscribed in registered()
        assert await cluster.subjects("room") == [
            SubjectPresence("alice", 2, [cluster.process], entries[0].since),
            SubjectPresence("bob", 1, [cluster.process], entries[1].since),
        ]

        # Leaving a channel, and disconnecting, leave presence at once.
        bob_conn = b.get_connection(entries[1].cid)
        bob_conn.unsubscribe("lobby")
        assert [e.subject for e in await cluster.presence("lobby")] == ["alice"]
        alice.close()
        await wait_until(lambda: len(a) == 1)
        assert [e.subject for e in await cluster.subjects("room")] == ["alice", "bob"]
        assert (await cluster.subjects("room"))[0].connections == 1
        for client in (bob, alice_tab, anonymous):
            client.close()
        await wait_until(lambda: cluster.presence_count() == 0)
        assert await cluster.presence("room") == []


async def test_join_and_leave_events_are_published_when_asked_for() -> None:
    broker = MemoryBroker()
    cluster = ControlPlane(broker, presence_events=True)
    handler = SubjectHandler(broker=broker, cluster=cluster)
    async with serve([handler.route("/a")], handler) as server:
        watcher = await server.stream("/a?channel=room&subject=watcher")
        joined = await watcher.next_event()
        assert joined.event == "presence"
        assert json.loads(joined.data)["subject"] == "watcher"
        visitor = await server.stream("/a?channel=room&subject=visitor")
        event = await watcher.next_event()
        visitor_cid = next(
            c for c in handler.connection_ids() if c != json.loads(joined.data)["cid"]
        )
        assert json.loads(event.data) == {
            "action": "join",
            "cid": visitor_cid,
            "subject": "visitor",
            "process": cluster.process,
            "since": handler.get_connection(visitor_cid).connected_at,
        }
        visitor.close()
        event = await watcher.next_event()
        assert (json.loads(event.data)["action"], json.loads(event.data)["cid"]) == (
            "leave",
            visitor_cid,
        )
        watcher.close()


@pytest.mark.parametrize("overridden", ["both", "stored_leave"])
async def test_a_plane_that_stores_presence_gets_each_join_and_leave(overridden: str) -> None:
    """Entries are made only when asked for, and for a plane that stores them:
    one that overrides ``stored_join``, ``stored_leave`` or both."""
    stored: list[tuple[str, str, PresenceEntry]] = []

    class LeavesOnly(ControlPlane):
        def stored_leave(self, channel: str, entry: PresenceEntry) -> None:
            stored.append(("leave", channel, entry))

    class Both(LeavesOnly):
        def stored_join(self, channel: str, entry: PresenceEntry) -> None:
            stored.append(("join", channel, entry))

    broker = MemoryBroker()
    cluster = (Both if overridden == "both" else LeavesOnly)(broker)
    handler = SubjectHandler(broker=broker, cluster=cluster)
    async with serve([handler.route("/a")], handler) as server:
        client = await server.stream("/a?channel=room&subject=carol")
        await wait_until(lambda: cluster.presence_count() == 1)
        conn = handler.connections()[0]
        expected = PresenceEntry(conn.cid, "carol", cluster.process, conn.connected_at)
        assert await cluster.presence("room") == [expected]
        client.close()
        await wait_until(lambda: cluster.presence_count() == 0)
        await wait_until(lambda: ("leave", "room", expected) in stored)
    joins = [("join", "room", expected)] if overridden == "both" else []
    assert stored == [*joins, ("leave", "room", expected)]


async def test_a_plane_whose_instance_stores_presence_gets_each_join_and_leave() -> None:
    """``stored_join`` / ``stored_leave`` set on the plane itself (a test's
    stand-in, say) are called as a subclass's would be."""
    calls: list[tuple[str, str, str]] = []
    broker = MemoryBroker()
    plane = ControlPlane(broker)
    plane.stored_join = lambda channel, e: calls.append(("join", channel, e.cid))  # type: ignore[method-assign]
    plane.stored_leave = lambda channel, e: calls.append(("leave", channel, e.cid))  # type: ignore[method-assign]
    handler = ServerSentEventHandler(broker=broker, cluster=plane)
    async with serve([handler.route("/a")], handler) as server:
        client = await server.stream("/a?channel=room")
        await wait_until(lambda: plane.presence_count() == 1)
        cid = handler.connection_ids()[0]
        client.close()
        await wait_until(lambda: plane.presence_count() == 0)
    assert calls == [("join", "room", cid), ("leave", "room", cid)]


async def test_no_presence_events_by_default() -> None:
    handler = SubjectHandler()
    async with serve([handler.route("/a")], handler) as server:
        watcher = await server.stream("/a?channel=room")
        other = await server.stream("/a?channel=room")
        await wait_until(lambda: len(handler) == 2)
        other.close()
        await wait_until(lambda: len(handler) == 1)
        await handler.publish("room", data="only this")
        assert (await watcher.next_event()).data == "only this"
        watcher.close()


# --- the admin API over the plane -------------------------------------------------------


async def test_admin_presence_and_subjects_routes() -> None:
    a, b, routes = two_handlers()
    assert a.cluster is not None
    routes += admin_routes(a, TOKEN)
    async with serve(routes, a, b) as server:
        tabs = [
            await server.stream("/a?channel=room%2F7&subject=alice"),
            await server.stream("/b?channel=room%2F7&subject=alice"),
        ]
        bob = await server.stream("/b?channel=room%2F7&subject=bob")
        await wait_until(lambda: a.cluster is not None and a.cluster.presence_count() == 3)

        response = await fetch(server.url + "/admin/presence/room%2F7", headers=AUTH)
        assert response.code == 200
        body = json.loads(response.body)
        assert body["channel"] == "room/7"
        entries = [PresenceEntry(**entry) for entry in body["connections"]]
        assert entries == await a.cluster.presence("room/7")
        assert [(s["subject"], s["connections"]) for s in body["subjects"]] == [
            ("alice", 2),
            ("bob", 1),
        ]
        empty = await fetch(server.url + "/admin/presence/nobody-here", headers=AUTH)
        assert json.loads(empty.body) == {
            "channel": "nobody-here",
            "connections": [],
            "subjects": [],
        }

        listing = json.loads((await fetch(server.url + "/admin/connections", headers=AUTH)).body)
        assert sorted((c["subject"], c["process"]) for c in listing) == [
            ("alice", a.cluster.process),
            ("alice", a.cluster.process),
            ("bob", a.cluster.process),
        ]

        stop = await fetch(server.url + "/admin/subjects/alice", "DELETE", AUTH)
        assert (stop.code, json.loads(stop.body)) == (200, {"stopped": 2})
        for tab in tabs:
            assert await tab.wait_closed() == [MessageEvent(data="", event="close")]
        again = await fetch(server.url + "/admin/subjects/alice", "DELETE", AUTH)
        assert (again.code, json.loads(again.body)) == (200, {"stopped": 0})
        bob.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/admin/presence/x", 401),
        ("DELETE", "/admin/subjects/x", 401),
        ("GET", "/admin/subjects/x", 405),
        ("DELETE", "/admin/presence/x", 405),
        ("DELETE", "/admin/subjects/%FF", 400),
        ("GET", "/admin/presence/%FF%FE", 400),
        ("GET", "/admin/presence/", 404),
        ("DELETE", "/admin/subjects/a/b", 404),
    ],
)
async def test_admin_new_routes_refuse_bad_requests_with_4xx(
    method: str, path: str, status: int
) -> None:
    handler = SubjectHandler()
    async with serve([handler.route("/a"), *admin_routes(handler, TOKEN)], handler) as server:
        headers = {} if status == 401 else AUTH
        response = await fetch(server.url + path, method, headers)
    assert response.code == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert list(json.loads(response.body)) == ["error"]
