"""sse_handler.heads: the request of a stream head seen before is a copy of
what Tornado built for it, with the parts of its own connection.

The guard of the copy: it must equal, attribute by attribute, what
Tornado's ``HTTPServerRequest`` builds for the same bytes on the same
connection, on every Tornado version tox runs (the oldest allowed and the
newest): an attribute that a new Tornado adds, or derives from the
connection, fails here first.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.httputil import (
    HTTPHeaders,
    HTTPServerRequest,
    RequestStartLine,
    parse_request_start_line,
)

from sse_handler.accept import DirectConnection, RequestContext
from sse_handler.heads import SeenHeads

HEADS = [
    b"GET /events HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n",
    b"GET /events?channel=a&channel=b&blank=&x=%C3%A9 HTTP/1.1\r\nHost: a:81\r\n\r\n",
    b"GET /events HTTP/1.1\r\nHost: A.example\r\nCookie: a=1\r\nCookie: b=2\r\n"
    b"Last-Event-ID: 17\r\n\r\n",
    b"GET /events HTTP/1.0\r\n\r\n",
]


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    pairs = [socket.socketpair() for _ in range(2)]
    yield [a for a, _ in pairs]
    for a, b in pairs:
        a.close()
        b.close()


def remember(
    seen_heads: SeenHeads, head: bytes, start_line: RequestStartLine, request: HTTPServerRequest
) -> None:
    """What the direct accept does with a request it built for ``head``."""
    state = seen_heads.snapshot(head, request)
    if state is not None:
        seen_heads.keep(head, start_line, state)


def tornados(head: bytes, conn: DirectConnection) -> tuple[RequestStartLine, HTTPServerRequest]:
    text = head.decode("latin-1")
    first, _, rest = text.partition("\r\n")
    start_line = parse_request_start_line(first)
    headers = HTTPHeaders.parse(rest)
    return start_line, HTTPServerRequest(start_line=start_line, headers=headers, connection=conn)


def comparable(request: HTTPServerRequest) -> dict[str, Any]:
    state = dict(vars(request))
    del state["_start_time"]
    state["headers"] = list(request.headers.get_all())
    return state


@pytest.mark.parametrize("head", HEADS)
def test_a_copy_is_what_tornado_builds_on_that_connection(
    head: bytes, socks: list[socket.socket]
) -> None:
    first = DirectConnection(socks[0], RequestContext(("127.0.0.1", 1), "127.0.0.1", "http"))
    second = DirectConnection(socks[1], RequestContext(("10.0.0.2", 2), "10.0.0.9", "https"))
    seen_heads = SeenHeads()
    start_line, request = tornados(head, first)
    remember(seen_heads, head, start_line, request)
    assert seen_heads.get(head) is None  # kept the second time only
    remember(seen_heads, head, start_line, request)
    seen = seen_heads.get(head)
    assert seen is not None
    before = time.time()
    copy = seen.request(seen.headers(), second)
    assert seen.start_line == start_line
    assert comparable(copy) == comparable(tornados(head, second)[1])
    assert copy.connection is second
    assert copy.remote_ip == "10.0.0.9" and copy.protocol == "https"
    assert copy._start_time >= before  # its own time, not the first request's


def test_a_copy_has_its_own_headers_and_arguments(socks: list[socket.socket]) -> None:
    head = HEADS[1]
    context = RequestContext(("127.0.0.1", 1), "127.0.0.1", "http")
    first = DirectConnection(socks[0], context)
    seen_heads = SeenHeads()
    start_line, request = tornados(head, first)
    remember(seen_heads, head, start_line, request)
    remember(seen_heads, head, start_line, request)
    # What hooks do to the first request, and to a copy, reaches no other.
    request.headers["X-Added"] = "1"
    request.arguments["channel"].append(b"c")
    request.query_arguments["channel"].append(b"c")
    seen = seen_heads.get(head)
    assert seen is not None
    copy = seen.request(seen.headers(), DirectConnection(socks[1], context))
    copy.headers.add("Host", "b")
    copy.arguments["x"].append(b"y")
    copy.query_arguments["x"].append(b"y")
    copy.body_arguments["z"] = [b"1"]
    copy.files["f"] = []
    third = DirectConnection(socks[1], context)
    again = seen.request(seen.headers(), third)
    assert comparable(again) == comparable(tornados(head, third)[1])


def test_the_set_is_bounded_and_keeps_only_heads_that_come_again() -> None:
    seen_heads = SeenHeads(limit=3, max_head=100)
    start_line = RequestStartLine("GET", "/", "HTTP/1.1")
    request = HTTPServerRequest(start_line=start_line, headers=HTTPHeaders({"Host": "a"}))
    for _ in range(2):
        remember(seen_heads, b"x" * 101, start_line, request)
    assert len(seen_heads) == 0  # too long to keep
    for n in range(1000):
        remember(seen_heads, b"a head of its own %d" % n, start_line, request)
    assert len(seen_heads) == 0  # each came once: nothing kept
    for n in range(7):
        for _ in range(2):
            remember(seen_heads, b"head %d" % n, start_line, request)
        assert len(seen_heads) <= 3
    assert seen_heads.get(b"head 6") is not None
