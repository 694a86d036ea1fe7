"""Stream requests whose headers were seen before, made without parsing them again.

Why: most stream requests of a deployment carry byte for byte the same
headers (one client library, one set of headers), and many the same request
line too (one URL); parsing a head and building Tornado's
``HTTPServerRequest`` for it was a fifth of the CPU of an accepted stream
(docs/benchmarks.md, notes). A request is a function of its head and its
connection: so the direct accept (:mod:`sse_handler.accept`) keeps the state
of the request of a few recent stream heads, by their header block (what
follows the request line), and for the same header block again makes a
copy of that state with the parts of its own: the connection and what comes
of it (the client's address, the scheme), fresh headers and argument lists
(a hook may change them), the start time, and, when its request line
differs from the kept one's only in the target (a channel or a token in the
query, say), the target and the arguments parsed from its query.

What is kept is exactly what Tornado built from those bytes; a test compares
a copy with what Tornado builds, attribute by attribute, on each Tornado
version the project supports. Routing still runs for every request.
"""

from __future__ import annotations

import time
from typing import Any

from tornado import httputil
from tornado.escape import parse_qs_bytes
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPInputError,
    HTTPServerRequest,
    RequestStartLine,
    parse_request_start_line,
)

__all__ = ["Seen", "SeenHeads"]


class SeenHeads:
    """The requests of up to ``limit`` header blocks of stream heads of up
    to ``max_head`` bytes, each kept the second time it comes; the first
    block past the limit starts the set over.

    Why the second time: keeping a request costs more than parsing one
    (copies of its state), which header blocks that come once (a token or
    cookie of their own in each) would pay for nothing: they cost a hash in
    a set.
    """

    def __init__(self, limit: int = 64, max_head: int = 4096) -> None:
        self.limit = limit
        self.max_head = max_head
        self._seen: dict[bytes, Seen] = {}
        # The same, by the whole head kept: most heads are that one again,
        # found by one hash and no slicing.
        self._heads: dict[bytes, tuple[Seen, RequestStartLine]] = {}
        # Hashes of heads seen once (a collision only keeps a head early).
        self._once: set[int] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def snapshot(self, head: bytes, request: HTTPServerRequest) -> dict[str, Any] | None:
        """The state of ``request``, just built for ``head`` and not yet seen
        by routing or hooks (which may add to it: a matcher that reads the
        cookies caches them on it), if ``head`` came before; :meth:`keep` it
        once the head is routed to a stream."""
        block = _block(head)
        if block is None or len(head) > self.max_head:
            return None
        key = hash(block)
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
        block = _block(head)
        if block is None:
            return
        # Each bound on its own: heads of one block in two versions replace
        # each other in _seen, and each would stay in _heads.
        if len(self._seen) >= self.limit:
            self._seen.clear()
        if len(self._heads) >= self.limit:
            self._heads.clear()
        # One value per name (the usual head): a plain dict makes the copies,
        # a third cheaper than HTTPHeaders.copy(), which adds value by value.
        headers = state["headers"]
        values = {name: headers.get_list(name) for name in headers}
        single = {name: got[0] for name, got in values.items() if len(got) == 1}
        seen = Seen(
            head[: len(head) - len(block)],
            start_line,
            state,
            single if len(single) == len(values) else None,
        )
        self._seen[block] = seen
        self._heads[head] = (seen, start_line)

    def get(self, head: bytes) -> tuple[Seen, RequestStartLine] | None:
        """What was kept for the header block of ``head``, and the request
        line of ``head``, if that block was seen and :meth:`Seen.request`
        can make the request of ``head`` from it (else parse ``head``)."""
        found = self._heads.get(head)
        if found is not None:
            return found
        block = _block(head)
        if block is None:
            return None
        seen = self._seen.get(block)
        if seen is None:
            return None
        start_line = seen.start_line_of(head[: len(head) - len(block)])
        return None if start_line is None else (seen, start_line)


def _block(head: bytes) -> bytes | None:
    """The header block of ``head``: what follows its request line (``None``
    for a head that begins with an empty line, which Tornado skips)."""
    if head[:1] in (b"\r", b"\n"):
        return None
    eol = head.find(b"\n")
    return None if eol < 0 else head[eol + 1 :]


class Seen:
    """The request Tornado built for one head."""

    __slots__ = ("_line", "_max_fields", "_single", "start_line", "state")

    def __init__(
        self,
        line: bytes,
        start_line: RequestStartLine,
        state: dict[str, Any],
        single: dict[str, str] | None = None,
    ) -> None:
        self._line = line
        # The limit on query fields its arguments were parsed under.
        self._max_fields = _max_fields()
        self.start_line = start_line
        self.state = state
        self._single = single

    def start_line_of(self, line: bytes) -> RequestStartLine | None:
        """The parsed request line ``line`` (its end of line included) of a
        head with this header block, if it is this one's, or differs from
        it only in the target; else ``None``.

        Why not another method or version: Tornado checks a head's headers
        against its version (HTTP/1.1 wants a ``Host``), and the direct
        accept takes only GETs; a head with either of its own is parsed."""
        if line == self._line:
            return self.start_line
        try:
            start_line = parse_request_start_line(line.decode("latin-1").rstrip("\r\n"))
        except HTTPInputError:
            return None
        kept = self.start_line
        if start_line.method != kept.method or start_line.version != kept.version:
            return None
        return start_line

    def headers(self) -> HTTPHeaders:
        """A copy of the head's headers, for one request."""
        if self._single is not None:
            return HTTPHeaders(self._single)
        headers: HTTPHeaders = self.state["headers"].copy()
        return headers

    def request(
        self,
        headers: HTTPHeaders,
        connection: HTTPConnection,
        start_line: RequestStartLine | None = None,
    ) -> HTTPServerRequest:
        """The request on ``connection``, with ``headers`` (from :meth:`headers`)
        and ``start_line`` (from :meth:`start_line_of`; by default the kept one).

        Raises ``HTTPInputError`` for a query Tornado would refuse."""
        state = self.state
        kept = start_line is None or start_line is self.start_line
        if kept and _max_fields() != self._max_fields:
            # The limit changed since (set_parse_body_config): the kept
            # arguments were parsed under the old one.
            kept, start_line = False, self.start_line
        if not kept:
            assert start_line is not None
            uri = start_line.path
            path, _, query = uri.partition("?")
            arguments = _query_arguments(query)
        request = HTTPServerRequest.__new__(HTTPServerRequest)
        own = vars(request)
        own.update(state)
        own["headers"] = headers
        own["connection"] = connection
        # As HTTPServerRequest.__init__ reads them off its connection.
        context = getattr(connection, "context", None)
        own["remote_ip"] = getattr(context, "remote_ip", None)
        own["protocol"] = getattr(context, "protocol", "http")
        # Tornado's own time of the request (request_time(), the access log).
        own["_start_time"] = time.time()
        if kept:
            own["arguments"] = _copied(state["arguments"])
            own["query_arguments"] = _copied(state["query_arguments"])
        else:
            own["uri"] = uri
            own["path"] = path
            own["query"] = query
            own["arguments"] = arguments
            own["query_arguments"] = _copied(arguments)
        own["body_arguments"] = {}
        own["files"] = {}
        return request


def _query_arguments(query: str) -> dict[str, list[bytes]]:
    """The arguments of ``query``, as ``HTTPServerRequest.__init__`` parses them."""
    if not query:
        return {}
    try:
        return parse_qs_bytes(query, keep_blank_values=True, max_num_fields=_max_fields())
    except Exception as e:
        raise HTTPInputError(f"Invalid query string: {e}") from e


def _max_fields() -> int:
    """Tornado's limit on the fields of a query, as it reads it at each
    request: from the global that httputil.set_parse_body_config() sets
    (there is no getter)."""
    return int(httputil._DEFAULT_PARSE_BODY_CONFIG.urlencoded.max_arguments)


def _copied(arguments: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
    # What Tornado's deepcopy gives for its argument lists (bytes are immutable).
    return {name: values[:] for name, values in arguments.items()} if arguments else {}
