"""Stream requests whose head was seen before, made without parsing it again.

Why: most stream requests of a deployment are byte for byte the same head
(one client library, one URL, one set of headers), and parsing it and
building Tornado's ``HTTPServerRequest`` for it was a fifth of the CPU of an
accepted stream (docs/benchmarks.md, notes). A request is a function of its
head and its connection: so the direct accept (:mod:`sse_handler.accept`)
keeps the state of the request of a few recent stream heads, and for the
same bytes again makes a copy of that state with the parts of its own: the
connection and what comes of it (the client's address, the scheme), fresh
headers and argument lists (a hook may change them), the start time.

What is kept is exactly what Tornado built from those bytes; a test compares
a copy with what Tornado builds, attribute by attribute, on each Tornado
version the project supports. Routing still runs for every request.
"""

from __future__ import annotations

import time
from typing import Any

from tornado.httputil import HTTPConnection, HTTPHeaders, HTTPServerRequest, RequestStartLine

__all__ = ["Seen", "SeenHeads"]


class SeenHeads:
    """The requests of up to ``limit`` stream heads of up to ``max_head``
    bytes, each kept the second time it comes; the first head past the
    limit starts the set over.

    Why the second time: keeping a request costs more than parsing one
    (copies of its state), which heads that come once (a channel or a token
    of their own in each) would pay for nothing: they cost a hash in a set.
    """

    def __init__(self, limit: int = 64, max_head: int = 4096) -> None:
        self.limit = limit
        self.max_head = max_head
        self._seen: dict[bytes, Seen] = {}
        # Hashes of heads seen once (a collision only keeps a head early).
        self._once: set[int] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def snapshot(self, head: bytes, request: HTTPServerRequest) -> dict[str, Any] | None:
        """The state of ``request``, just built for ``head`` and not yet seen
        by routing or hooks (which may add to it: a matcher that reads the
        cookies caches them on it), if ``head`` came before; :meth:`keep` it
        once the head is routed to a stream."""
        if len(head) > self.max_head:
            return None
        key = hash(head)
        if key not in self._once:
            if len(self._once) >= 64 * self.limit:
                self._once.clear()
            self._once.add(key)
            return None
        state = dict(vars(request))
        # Copies: the request goes on to routing and hooks, which may change it.
        headers = request.headers
        state["headers"] = headers.copy()
        state["arguments"] = _copied(request.arguments)
        state["query_arguments"] = _copied(request.query_arguments)
        state["connection"] = None  # not kept alive by the set
        return state

    def keep(self, head: bytes, start_line: RequestStartLine, state: dict[str, Any]) -> None:
        """Keep a :meth:`snapshot` of the request of ``head``."""
        if len(self._seen) >= self.limit:
            self._seen.clear()
        # One value per name (the usual head): a plain dict makes the copies,
        # a third cheaper than HTTPHeaders.copy(), which adds value by value.
        headers = state["headers"]
        values = {name: headers.get_list(name) for name in headers}
        single = {name: got[0] for name, got in values.items() if len(got) == 1}
        self._seen[head] = Seen(start_line, state, single if len(single) == len(values) else None)

    def get(self, head: bytes) -> Seen | None:
        """What was kept for ``head``, if it was seen."""
        return self._seen.get(head)


class Seen:
    """The request Tornado built for one head."""

    __slots__ = ("_single", "start_line", "state")

    def __init__(
        self,
        start_line: RequestStartLine,
        state: dict[str, Any],
        single: dict[str, str] | None = None,
    ) -> None:
        self.start_line = start_line
        self.state = state
        self._single = single

    def headers(self) -> HTTPHeaders:
        """A copy of the head's headers, for one request."""
        if self._single is not None:
            return HTTPHeaders(self._single)
        headers: HTTPHeaders = self.state["headers"].copy()
        return headers

    def request(self, headers: HTTPHeaders, connection: HTTPConnection) -> HTTPServerRequest:
        """The request on ``connection``, with ``headers`` (from :meth:`headers`)."""
        request = HTTPServerRequest.__new__(HTTPServerRequest)
        own = vars(request)
        state = self.state
        own.update(state)
        own["headers"] = headers
        own["connection"] = connection
        # As HTTPServerRequest.__init__ reads them off its connection.
        context = getattr(connection, "context", None)
        own["remote_ip"] = getattr(context, "remote_ip", None)
        own["protocol"] = getattr(context, "protocol", "http")
        # Tornado's own time of the request (request_time(), the access log).
        own["_start_time"] = time.time()
        own["arguments"] = _copied(state["arguments"])
        own["query_arguments"] = _copied(state["query_arguments"])
        own["body_arguments"] = {}
        own["files"] = {}
        return request


def _copied(arguments: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
    # What Tornado's deepcopy gives for its argument lists (bytes are immutable).
    return {name: values[:] for name, values in arguments.items()} if arguments else {}
