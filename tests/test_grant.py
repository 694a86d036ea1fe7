"""Channel patterns, and a Grant returned by authorize(): channels, subject, expiry."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import serve
from tornado.httpclient import AsyncHTTPClient
from tornado.httputil import HTTPServerRequest

from sse_handler import CloseReason, ServerSentEventConnection, ServerSentEventHandler
from sse_handler.grant import Grant
from sse_handler.patterns import ChannelPatterns, channel_matches
from sse_handler.testing import EventStreamClient

MATCHES = [
    ("news", "news", True),
    ("news", "news2", False),
    ("news", "new", False),
    ("*", "", True),
    ("*", "anything:at/all", True),
    ("room:*", "room:", True),
    ("room:*", "room:7:chat", True),
    ("room:*", "roo", False),
    ("room:*", "xroom:7", False),
    ("*:chat", "room:7:chat", True),
    ("*:chat", "room:7:chats", False),
    ("a*b*c", "abc", True),
    ("a*b*c", "aXbYc", True),
    ("a*b*c", "acb", False),
    ("a*a", "a", False),  # prefix and suffix may not overlap
    ("a*a", "aa", True),
    ("ab*ba*ab", "abbaab", True),
    ("ab*ba*ab", "abab", False),
    ("**", "x", True),
    ("user:*:inbox", "user:alice:inbox", True),
    ("user:*:inbox", "user:alice:outbox", False),
]


@pytest.mark.parametrize(("pattern", "channel", "expected"), MATCHES)
def test_channel_matches(pattern: str, channel: str, expected: bool) -> None:
    assert channel_matches(pattern, channel) is expected
    assert (channel in ChannelPatterns([pattern])) is expected


def test_many_stars_on_a_long_channel_take_no_time() -> None:
    started = time.perf_counter()
    assert not channel_matches("a" + "*a" * 50 + "b", "a" * 20_000)
    assert time.perf_counter() - started < 1.0


def test_patterns_refuse_a_single_string_and_non_strings() -> None:
    with pytest.raises(TypeError, match="single string"):
        ChannelPatterns("room:*")
    with pytest.raises(TypeError, match="must be a string"):
        ChannelPatterns([7])  # type: ignore[list-item]
    assert not ChannelPatterns()
    assert "x" not in ChannelPatterns()


class Conn(ServerSentEventConnection):
    def registered(self) -> None:
        self.send(event="welcome", data={"subject": self.subject})


class GrantHandler(ServerSentEventHandler):
    connection_class = Conn
    grant_ttl: float | None = None

    def authorize(self, request: HTTPServerRequest) -> Grant:
        expires = None if self.grant_ttl is None else time.time() + self.grant_ttl
        return Grant(["room:*"], subject="alice", expires_at=expires)


async def test_a_grant_allows_the_channels_it_covers_and_names_the_subject() -> None:
    handler = GrantHandler()
    async with serve([handler.route(r"/events")], handler) as server:
        client = await server.stream("/events?channel=room:1&channel=room:2")
        async with client:
            assert client.status == 200
            welcome = await client.next_event()
            assert welcome.data == '{"subject":"alice"}'
            [conn] = handler.connections()
            assert conn.subject == "alice"
            assert conn.channels == {"room:1", "room:2"}
            assert conn.auth_expires_at is None


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_channel_outside_the_grant_gets_403(method: str) -> None:
    handler = GrantHandler()
    async with serve([handler.route(r"/events")], handler) as server:
        for query in ("?channel=room:1&channel=news", "", "?channel=roo"):
            response = await AsyncHTTPClient().fetch(
                server.url + "/events" + query, method=method, raise_error=False
            )
            assert response.code == 403, query
        assert len(handler) == 0
        assert handler.stats().opened == 0


async def test_a_stream_ends_with_auth_expired_when_its_grant_does() -> None:
    handler = GrantHandler(reconnect_retry=(700, 700))
    handler.grant_ttl = 0.4
    async with serve([handler.route(r"/events")], handler) as server:
        client = await server.stream("/events?channel=room:1")
        async with client:
            await client.next_event()
            [conn] = handler.connections()
            assert conn.auth_expires_at is not None
            opened = time.monotonic()
            [farewell] = await client.wait_closed(timeout=3)
            assert time.monotonic() - opened > 0.2
            assert (farewell.event, farewell.data) == ("auth_expired", "")
            assert client.parser.retry == 700
            assert await asyncio.wait_for(conn.wait_closed(), 3) == CloseReason.AUTH_EXPIRED
        assert handler.stats().closed == {"auth_expired": 1}


async def test_a_grant_already_expired_closes_the_stream_at_once() -> None:
    handler = GrantHandler()
    handler.grant_ttl = -5
    async with serve([handler.route(r"/events")], handler) as server:
        client = await server.stream("/events?channel=room:1")
        async with client:
            assert client.status == 200
            names = [event.event for event in await client.wait_closed(timeout=3)]
            assert names[-1] == "auth_expired"


async def test_many_expiries_each_at_its_own_time() -> None:
    handler = GrantHandler()
    async with serve([handler.route(r"/events")], handler) as server:
        clients = []
        for ttl in (0.9, 0.3, 0.6):
            handler.grant_ttl = ttl
            clients.append(await server.stream("/events?channel=room:x"))
            await clients[-1].next_event()
        order: list[int] = []

        async def watch(i: int, client: EventStreamClient) -> None:
            await client.wait_closed(timeout=5)
            order.append(i)

        await asyncio.gather(*(watch(i, c) for i, c in enumerate(clients)))
        assert order == [1, 2, 0]
        for client in clients:
            client.close()


async def test_a_route_group_channel_is_checked_against_the_grant() -> None:
    handler = GrantHandler()
    async with serve([handler.route(r"/events/(?P<channel>[^/]+)")], handler) as server:
        fetch = AsyncHTTPClient().fetch
        assert (await fetch(server.url + "/events/room:1", method="HEAD")).code == 200
        response = await fetch(server.url + "/events/news", method="HEAD", raise_error=False)
        assert response.code == 403
