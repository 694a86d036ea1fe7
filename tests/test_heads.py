"""sse_handler.heads: the request of a stream head seen before is a copy of
what Tornado built for it, with the parts of its own connection.

The guard of the copy: it must equal, attribute by attribute, what
Tornado's ``HTTPServerRequest`` builds for the same bytes on the same
connection, on every Tornado version tox runs (the oldest allowed and the
newest): an attribute that a new Tornado adds, or derives from the
connection, fails here first.
"""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tornado import httputil
from tornado.httputil import (
    HTTPHeaders,
    HTTPInputError,
    HTTPServerRequest,
    RequestStartLine,
    parse_request_start_line,
)

from sse_handler.accept import DirectConnection, RequestContext
from sse_handler.heads import Seen, SeenHeads

HEADS = [
    b"GET /events HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n",
    b"GET /events?channel=a&channel=b&blank=&x=%C3%A9 HTTP/1.1\r\nHost: a:81\r\n\r\n",
    b"GET /events HTTP/1.1\r\nHost: A.example\r\nCookie: a=1\r\nCookie: b=2\r\n"
    b"Last-Event-ID: 17\r\n\r\n",
    b"GET /events HTTP/1.0\r\n\r\n",
]


CONTEXT = RequestContext(("127.0.0.1", 1), "127.0.0.1", "http")


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


def kept_twice(head: bytes, sock: socket.socket) -> SeenHeads:
    """A set that kept the request of ``head`` (built on ``sock``): it came twice."""
    seen_heads = SeenHeads()
    start_line, request = tornados(head, DirectConnection(sock, CONTEXT))
    for _ in range(2):
        remember(seen_heads, head, start_line, request)
    return seen_heads


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
    found = seen_heads.get(head)
    assert found is not None
    seen, line = found
    before = time.time()
    copy = seen.request(seen.headers(), second, line)
    assert line == seen.start_line == start_line
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
    found = seen_heads.get(head)
    assert found is not None
    seen, _ = found
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
        long_head = b"GET / HTTP/1.1\r\nX: " + b"x" * 101 + b"\r\n\r\n"
        remember(seen_heads, long_head, start_line, request)
    assert len(seen_heads) == 0  # too long to keep
    for n in range(1000):
        remember(seen_heads, b"GET / HTTP/1.1\r\nX-Own: %d\r\n\r\n" % n, start_line, request)
    assert len(seen_heads) == 0  # each came once: nothing kept
    for n in range(7):
        for _ in range(2):
            remember(seen_heads, b"GET / HTTP/1.1\r\nX-N: %d\r\n\r\n" % n, start_line, request)
        assert len(seen_heads) <= 3
    assert seen_heads.get(b"GET / HTTP/1.1\r\nX-N: 6\r\n\r\n") is not None


BLOCK = b"Host: a:81\r\nAccept: text/event-stream\r\nCookie: a=1\r\n\r\n"
TARGETS = [
    b"/events",
    b"/events?channel=a",
    b"/events?channel=a&channel=b&blank=&x=%C3%A9&=v&k",
    b"/other/path?token=%2F%3F%26",
    b"/events?",
    b"http://a:81/events?channel=z",
]


@pytest.mark.parametrize("target", TARGETS)
def test_a_head_that_differs_only_in_its_target_is_what_tornado_builds(
    target: bytes, socks: list[socket.socket]
) -> None:
    """Heads with the same header block share what was kept, whatever the
    target of their request line: a channel or a token in each query."""
    context = RequestContext(("127.0.0.1", 1), "127.0.0.1", "http")
    seen_heads = SeenHeads()
    for n in range(2):  # kept the second time the block comes
        kept = b"GET /events?channel=kept%d HTTP/1.1\r\n" % n + BLOCK
        start_line, request = tornados(kept, DirectConnection(socks[0], context))
        remember(seen_heads, kept, start_line, request)
    head = b"GET " + target + b" HTTP/1.1\r\n" + BLOCK
    found = seen_heads.get(head)
    assert found is not None
    seen, line = found
    conn = DirectConnection(socks[1], context)
    copy = seen.request(seen.headers(), conn, line)
    expected_line, expected = tornados(head, conn)
    assert line == expected_line
    assert comparable(copy) == comparable(expected)
    # Its own argument lists: a hook changing them reaches no other request.
    again = seen.request(seen.headers(), conn, line)
    assert again.arguments is not copy.arguments
    assert all(again.arguments[k] is not copy.arguments[k] for k in copy.arguments)
    assert again.query_arguments is not again.arguments


@pytest.mark.parametrize(
    "line",
    [
        b"POST /events HTTP/1.1\r\n",  # another method: parsed whole, as Tornado would
        b"GET /events HTTP/1.0\r\n",  # another version: Host rules differ
        b"GET /events HTTP/1.1 extra\r\n",  # malformed: Tornado answers it
        b"GET  /events HTTP/1.1\r\n",
        b"\r\nGET /events HTTP/1.1\r\n",  # a leading empty line, which Tornado skips
    ],
)
def test_a_head_with_another_method_or_version_is_not_made_from_a_kept_one(
    line: bytes, socks: list[socket.socket]
) -> None:
    kept = b"GET /events HTTP/1.1\r\n" + BLOCK
    seen_heads = kept_twice(kept, socks[0])
    assert seen_heads.get(kept) is not None
    assert seen_heads.get(line + BLOCK) is None


def test_a_query_tornado_refuses_is_refused(socks: list[socket.socket]) -> None:
    """More fields than Tornado's limit (set_parse_body_config): the same
    HTTPInputError, so the connection goes to Tornado, which answers 400."""
    seen_heads = kept_twice(b"GET /events HTTP/1.1\r\n" + BLOCK, socks[0])
    head = b"GET /events?" + b"&".join(b"a=%d" % n for n in range(1001)) + b" HTTP/1.1\r\n" + BLOCK
    conn = DirectConnection(socks[1], CONTEXT)
    with pytest.raises(HTTPInputError):
        tornados(head, conn)
    found = seen_heads.get(head)
    assert found is not None
    seen, line = found
    with pytest.raises(HTTPInputError):
        seen.request(seen.headers(), conn, line)


def test_heads_of_one_block_in_two_versions_stay_bounded(socks: list[socket.socket]) -> None:
    """A client alternating HTTP/1.0 and HTTP/1.1 request lines, each with a
    query of its own, over one header block: each head is parsed and kept
    again; what is kept must stay within the limit."""
    seen_heads = SeenHeads(limit=8)
    for n in range(400):
        version = b"HTTP/1.0" if n % 2 else b"HTTP/1.1"
        head = b"GET /events?n=%d " % n + version + b"\r\n" + BLOCK
        if seen_heads.get(head) is None:
            start_line, request = tornados(head, DirectConnection(socks[0], CONTEXT))
            remember(seen_heads, head, start_line, request)
    kept = sum(isinstance(o, Seen) for o in gc.get_objects())
    assert kept <= 2 * 8


def test_a_kept_head_follows_a_lower_query_limit(socks: list[socket.socket]) -> None:
    """set_parse_body_config() lowering the limit on query fields after a
    head was kept: the copy is refused as Tornado refuses the head."""
    head = b"GET /events?a=1&b=2&c=3 HTTP/1.1\r\n" + BLOCK
    found = kept_twice(head, socks[0]).get(head)
    assert found is not None
    seen, line = found
    conn = DirectConnection(socks[1], CONTEXT)
    httputil.set_parse_body_config(
        httputil.ParseBodyConfig(urlencoded=httputil.ParseUrlEncodedConfig(max_arguments=2))
    )
    try:
        with pytest.raises(HTTPInputError):
            tornados(head, conn)
        with pytest.raises(HTTPInputError):
            seen.request(seen.headers(), conn, line)
    finally:
        httputil.set_parse_body_config(httputil.ParseBodyConfig())
    assert comparable(seen.request(seen.headers(), conn, line)) == comparable(
        tornados(head, conn)[1]
    )
