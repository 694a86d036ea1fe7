"""sse_handler.route_memo: a stream head routed before is routed the same way
without walking the rules, only where routing looks at nothing but the head.

Real servers and sockets: the same head bytes from two client addresses, and
a rule added while the server runs.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from support import wait_until
from tornado.httputil import HTTPServerRequest
from tornado.routing import Matcher, PathMatches, Rule
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from sse_handler import ServerSentEventHandler
from sse_handler.route_memo import RouteMemo
from sse_handler.server import BoundedHTTPServer, make_server

HEAD = b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n"


class Hello(RequestHandler):
    def get(self) -> None:
        self.write("hello")


class FromAddress(Matcher):
    """Routes by the client's address: something the head does not say."""

    def __init__(self, remote_ip: str) -> None:
        self.remote_ip = remote_ip

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        return {} if request.remote_ip == self.remote_ip else None


@asynccontextmanager
async def served(app: Application) -> AsyncIterator[tuple[BoundedHTTPServer, int]]:
    sock, port = bind_unused_port()
    server = make_server(app)
    server.add_sockets([sock])
    try:
        yield server, port
    finally:
        server.stop()
        await server.close_all_connections()


def request_from(source: str, port: int) -> socket.socket:
    client = socket.socket()
    client.bind((source, 0))
    client.connect(("127.0.0.1", port))
    client.sendall(HEAD)
    client.settimeout(5)
    return client


def first_bytes(client: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


async def test_the_same_head_is_routed_without_a_walk_where_routing_is_by_head() -> None:
    handler = ServerSentEventHandler()
    app = Application([(r"/hello", Hello), handler.route("/events")])
    async with served(app) as (server, port):
        assert server.direct is not None
        sources = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
        clients = [request_from(source, port) for source in sources]
        try:
            await wait_until(lambda: len(handler) == 3)
            assert len(server.direct.routes) == 1
        finally:
            for client in clients:
                client.close()
            await handler.shutdown(grace=0.2)


async def test_routing_by_something_else_than_the_head_is_done_every_time() -> None:
    """The same bytes from 127.0.0.2 go to another handler than from
    127.0.0.1: remembering the first route would open a stream there."""
    handler = ServerSentEventHandler()
    app = Application(
        [Rule(FromAddress("127.0.0.2"), Hello), handler.route("/events")]  # type: ignore[list-item]
    )
    async with served(app) as (server, port):
        assert server.direct is not None
        # Three times from 127.0.0.1: the third is routed from the seen head.
        firsts = [request_from("127.0.0.1", port) for _ in range(3)]
        try:
            await wait_until(lambda: len(handler) == 3)
            second = request_from("127.0.0.2", port)
            data = await asyncio.to_thread(first_bytes, second)
            second.close()
            assert data.startswith(b"HTTP/1.1 200 OK"), data
            assert b"text/event-stream" not in data
            assert len(handler) == 3
            assert len(server.direct.routes) == 0
        finally:
            for first in firsts:
                first.close()
            await handler.shutdown(grace=0.2)


async def test_a_rule_added_while_serving_is_seen() -> None:
    """add_handlers() puts a host's rules before the catch-all: /events then
    answers "hello", for the very head that opened a stream before."""
    handler = ServerSentEventHandler()
    app = Application([handler.route("/events")])
    await _rerouted_after_three_streams(
        app, handler, lambda: app.add_handlers(r".*", [(r"/events", Hello)])
    )


def test_routing_by_head_alone_is_told_apart() -> None:
    handler = ServerSentEventHandler()
    by_head = Application([(r"/hello", Hello), handler.route("/events")])
    by_head.add_handlers(r"other\.example", [(r"/x", Hello)])
    assert RouteMemo(by_head)._current()
    callable_target = Application([Rule(PathMatches("/f"), lambda request: None)])
    assert not RouteMemo(callable_target)._current()

    class Custom(Application):
        def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> Any:
            return super().find_handler(request, **kwargs)

    assert not RouteMemo(Custom([handler.route("/events")]))._current()


class ReadsCookies(Matcher):
    """Matches nothing, but reads the cookies on the way (Tornado caches them
    on the request)."""

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        assert request.cookies is not None
        return None


async def test_what_routing_adds_to_a_request_is_not_copied_to_the_next() -> None:
    """A seen head's request is kept as Tornado built it, before routing:
    the cookies a matcher read (cached on the request) are each request's own."""
    cookies: list[object] = []

    class Recording(ServerSentEventHandler):
        def get_connection_impl(self, request: HTTPServerRequest, *args: Any) -> Any:
            cookies.append(request.cookies)
            return super().get_connection_impl(request, *args)

    handler = Recording()
    app = Application(
        [Rule(ReadsCookies(), Hello), handler.route("/events")]  # type: ignore[list-item]
    )
    async with served(app) as (server, port):
        assert server.direct is not None
        clients = [request_from("127.0.0.1", port) for _ in range(4)]
        try:
            await wait_until(lambda: len(handler) == 4)
            assert len(server.direct.seen_heads) == 1
            assert len({id(jar) for jar in cookies}) == 4
        finally:
            for client in clients:
                client.close()
            await handler.shutdown(grace=0.2)


async def test_a_rule_replaced_in_place_is_seen() -> None:
    """The same number of rules, one of them another: /events then answers
    "hello", for the very head that opened streams before."""
    handler = ServerSentEventHandler()
    app = Application([(r"/other", Hello), handler.route("/events")])
    await _rerouted_after_three_streams(
        app, handler, lambda: app.wildcard_router.rules.__setitem__(0, _hello_at_events)
    )


_hello_at_events = Rule(PathMatches(r"/events"), Hello)


async def _rerouted_after_three_streams(
    app: Application, handler: ServerSentEventHandler, change: Callable[[], None]
) -> None:
    """Three streams of one head (its route remembered by the third), then
    ``change`` routes /events to Hello: the same head must get "hello"."""
    async with served(app) as (server, port):
        assert server.direct is not None
        firsts = [request_from("127.0.0.1", port) for _ in range(3)]
        try:
            await wait_until(lambda: len(handler) == 3)
            assert len(server.direct.routes) == 1
            change()
            second = request_from("127.0.0.1", port)
            data = await asyncio.to_thread(first_bytes, second)
            second.close()
            assert b"text/event-stream" not in data, data
            assert len(handler) == 3
        finally:
            for first in firsts:
                first.close()
            await handler.shutdown(grace=0.2)
