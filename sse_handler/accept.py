"""Taking a stream request straight off a new connection.

Why: a stream request leaves Tornado as soon as it is accepted, yet
Tornado's HTTP/1 server connection was the larger part of the CPU of an
accept (a task, an ``HTTP1Connection`` and its futures, a read through the
``IOStream``'s buffer under a timer; docs/benchmarks.md). So the server of
:func:`~sse_handler.server.make_server` looks at the first request of each
new plain TCP or Unix connection itself. It *peeks* at the socket
(``MSG_PEEK``: nothing is consumed). When the bytes there are a whole ``GET``
head without a body that the application routes to a stream endpoint, the
request is taken here and given to that endpoint as Tornado would give it.
In every other case (another route or method, a head not complete yet, input
Tornado would refuse) the connection goes to Tornado untouched, exactly as
without this path, and Tornado answers it.

A head whose header block was taken before is not parsed again: its request
is a copy of the first one's, with the parts of its own, its request line's
target among them (:mod:`sse_handler.heads`), and, where the application's
routing looks at nothing but the head, it is not routed again either
(:mod:`sse_handler.route_memo`).

The connection arrives as the accepted socket, before Tornado wraps it in an
``IOStream``: a stream's socket goes to its transport without one, and only
a connection that Tornado serves, or that waits on an ``async authorize()``,
gets one.
"""

from __future__ import annotations

import _socket
import asyncio
import collections
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from tornado import httputil
from tornado.concurrent import Future
from tornado.escape import native_str
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from tornado.iostream import IOStream
from tornado.netutil import is_valid_ip
from tornado.web import Application

from .closing import answer_and_close, declares_body
from .heads import SeenHeads
from .route_memo import RouteMemo
from .routing import StreamRequest
from .tasks import log, spawn
from .transport import Tuning

__all__ = ["DirectAccept", "DirectConnection", "RequestContext", "simple_headers"]

# Tornado's own end of a request head (bare LF allowed, RFC 9112 section 2.2).
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# What Tornado accepts in a field name (RFC 9110: a token) and value
# (visible characters, obs-text, spaces and tabs).
_NAMES = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NOT_IN_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")
# Most heads fit; a longer one is peeked again up to max_header_size.
_FIRST_PEEK = 4096
_INET = (socket.AF_INET, socket.AF_INET6)
_family = cast(Callable[[socket.socket], int], _socket.socket.family.__get__)
_STREAM_VERSIONS = ("HTTP/1.1", "HTTP/1.0")

Fallback = Callable[[socket.socket, Any], None]


class RequestContext:
    """What ``HTTPServerRequest`` and the access log read off a connection:
    the client's address (after ``xheaders``) and the scheme."""

    __slots__ = ("address", "inet", "protocol", "remote_ip")

    def __init__(self, address: Any, remote_ip: str, protocol: str, inet: bool = True) -> None:
        self.address = address
        self.remote_ip = remote_ip
        self.protocol = protocol
        #: An IPv4 or IPv6 connection (else a Unix socket's, say).
        self.inet = inet

    def __str__(self) -> str:
        # As Tornado's own context: the IP, else the socket's address.
        if self.inet:
            return self.remote_ip
        if isinstance(self.address, bytes):
            return native_str(self.address)
        return str(self.address)


class DirectConnection(httputil.HTTPConnection):
    """The connection of a request taken off the socket here: detached into a
    stream, or answered once with ``Connection: close`` (the request was read
    by this path, not by Tornado, so nothing would read the next one)."""

    def __init__(
        self, sock: socket.socket, context: RequestContext, listener_tuning: Tuning | None = None
    ) -> None:
        self.sock = sock
        self.context = context
        #: The options its listening socket was tuned with, which it inherited.
        self.listener_tuning = listener_tuning
        self._stream: IOStream | None = None
        self._out: list[bytes] = []

    @property
    def stream(self) -> IOStream:
        """The socket as Tornado's ``IOStream``, made on first use (an answer,
        or a watch for the client leaving during an ``async authorize()``)."""
        if self._stream is None:
            self._stream = IOStream(self.sock)
        return self._stream

    def detach_socket(self) -> socket.socket | None:
        """The socket for a stream's transport; ``None`` if the client left
        while an ``IOStream`` watched it."""
        stream = self._stream
        if stream is None:
            return self.sock
        if stream.closed():
            return None
        stream.io_loop.remove_handler(self.sock.fileno())
        return self.sock

    def write_headers(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: HTTPHeaders,
        chunk: bytes | None = None,
    ) -> Future[None]:
        assert isinstance(start_line, httputil.ResponseStartLine)
        headers["Connection"] = "close"
        lines = [f"HTTP/1.1 {start_line.code} {start_line.reason}"]
        lines += [f"{name}: {value}" for name, value in headers.get_all()]
        self._out.append(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return self.write(chunk or b"")

    def write(self, chunk: bytes) -> Future[None]:
        self._out.append(chunk)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def finish(self) -> None:
        answer_and_close(self.stream, b"".join(self._out))


#: A stream request taken off its socket: what :func:`_serve` needs.
_Taken = tuple[HTTPServerRequest, StreamRequest, RequestStartLine, DirectConnection]


class DirectAccept:
    """The first request of new connections, for one server (module docstring).

    ``fallback(sock, address)`` serves a connection through Tornado.
    ``xheaders``, ``protocol`` and ``trusted_downstream`` are the
    ``HTTPServer``'s, applied as Tornado applies them.
    """

    def __init__(
        self,
        app: Application,
        fallback: Fallback,
        *,
        max_header_size: int,
        xheaders: bool = False,
        protocol: str | None = None,
        trusted_downstream: Iterable[str] | None = None,
    ) -> None:
        self.app = app
        self.fallback = fallback
        self.max_header_size = max_header_size
        self.xheaders = xheaders
        self.protocol = protocol or "http"
        self.trusted_downstream = frozenset(trusted_downstream or ())
        #: New connections served per turn of the event loop (see take()).
        self.per_turn = 16
        #: What the server tuned its listening sockets with
        #: (:func:`~sse_handler.transport.tune_listener`), if it did.
        self.listener_tuning: Tuning | None = None
        #: The requests of recent stream heads (:mod:`sse_handler.heads`).
        self.seen_heads = SeenHeads()
        #: Their stream routes, where routing depends on the head alone
        #: (:mod:`sse_handler.route_memo`).
        self.routes = RouteMemo(app)
        self._waiting: collections.deque[tuple[socket.socket, Any]] = collections.deque()
        self._scheduled = False

    def take(self, sock: socket.socket, address: Any) -> None:
        """Serve a new connection: its stream request here, anything else by Tornado.

        Connections are served at most :attr:`per_turn` per turn of the event
        loop, in order of arrival: Tornado accepts up to 128 at once, and
        serving them all in one callback would hold back, for as long as that
        takes, every other stream's events waiting on the loop (a reconnect
        storm or a deploy would make everyone's events late).
        """
        self._waiting.append((sock, address))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._serve_some)

    def _serve_some(self) -> None:
        waiting = self._waiting
        try:
            batch = [waiting.popleft() for _ in range(min(self.per_turn, len(waiting)))]
            # In phases, each over the whole batch: peek at every socket, then
            # parse and route every head, then serve each. A phase's code and
            # data stay in the CPU's caches across the batch instead of being
            # evicted by the next connection's system calls: 0.88x the user
            # CPU per accept of serving one connection after the other
            # (docs/benchmarks.md, notes).
            heads = [self._peek(sock) for sock, _ in batch]
            taken = [
                None if head is None else self._route(sock, address, head)
                for (sock, address), head in zip(batch, heads, strict=True)
            ]
            for (sock, address), head, stream in zip(batch, heads, taken, strict=True):
                try:
                    self._serve_one(sock, address, head, stream)
                except Exception:
                    log.exception("Uncaught exception while accepting a connection")
                    sock.close()
        finally:
            if waiting:
                asyncio.get_running_loop().call_soon(self._serve_some)
            else:
                self._scheduled = False

    def _peek(self, sock: socket.socket) -> bytes | None:
        """The whole head waiting on a new connection (peeked, not consumed), if any."""
        try:
            sock.setblocking(False)  # as IOStream would make it
            return self._peek_head(sock)
        except Exception:
            return None  # not readable yet, or gone: Tornado reads it

    def _route(self, sock: socket.socket, address: Any, head: bytes) -> _Taken | None:
        try:
            return self._stream_request(sock, address, head)
        except Exception:
            # A head that fails a check Tornado also makes (e.g. a Host port
            # too long to convert), or a router that raises: nothing is
            # consumed, so Tornado reads it and answers.
            return None

    def _serve_one(
        self, sock: socket.socket, address: Any, head: bytes | None, taken: _Taken | None
    ) -> None:
        if head is None or taken is None:
            self.fallback(sock, address)
            return
        try:
            sock.recv(len(head))  # the head was only peeked: consume it
        except OSError:
            pass  # the client is gone; the stream sees it on its first write
        _serve(*taken)

    def _peek_head(self, sock: socket.socket) -> bytes | None:
        data = sock.recv(_FIRST_PEEK, socket.MSG_PEEK)
        end = _HEAD_END.search(data)
        if end is None and len(data) == _FIRST_PEEK and self.max_header_size > _FIRST_PEEK:
            data = sock.recv(self.max_header_size, socket.MSG_PEEK)
            end = _HEAD_END.search(data)
        if end is None or end.end() > self.max_header_size:
            return None
        return data[: end.end()]

    def _stream_request(self, sock: socket.socket, address: Any, head: bytes) -> _Taken | None:
        """The request and its endpoint's delegate, if the head is a GET that
        Tornado would accept and route to a stream endpoint."""
        found = self.seen_heads.get(head)
        if found is not None:
            seen, start_line = found
            headers = seen.headers()
            context = self._context(sock, address, headers)
            conn = DirectConnection(sock, context, self.listener_tuning)
            try:
                request = seen.request(headers, conn, start_line)
            except httputil.HTTPInputError:
                return None
            delegate = self.routes.find(head, request)
            if delegate is None:
                routed = self.app.find_handler(request)
                if not isinstance(routed, StreamRequest):
                    return None
                self.routes.remember(head, routed)
                delegate = routed
            return request, delegate, start_line, conn
        return self._parse(sock, address, head)

    def _parse(self, sock: socket.socket, address: Any, head: bytes) -> _Taken | None:
        # As Tornado parses a head (HTTP1Connection._parse_headers).
        text = head.decode("latin-1").lstrip("\r\n")
        eol = text.find("\n")
        if eol < 0:
            return None
        try:
            start_line = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
            if start_line.method != "GET" or start_line.version not in _STREAM_VERSIONS:
                return None
            headers = simple_headers(text[eol + 1 :]) or HTTPHeaders.parse(text[eol:])
            if declares_body(headers):
                return None
            context = self._context(sock, address, headers)
            conn = DirectConnection(sock, context, self.listener_tuning)
            request = HTTPServerRequest(start_line=start_line, headers=headers, connection=conn)
        except httputil.HTTPInputError:
            return None
        # Before routing, which may add to the request.
        state = self.seen_heads.snapshot(head, request)
        delegate = self.app.find_handler(request)
        if not isinstance(delegate, StreamRequest):
            return None
        if state is not None:
            self.seen_heads.keep(head, start_line, state)
        return request, delegate, start_line, conn

    def _context(self, sock: socket.socket, address: Any, headers: HTTPHeaders) -> RequestContext:
        """The client's address and scheme, as Tornado's ``HTTPServer`` sets them."""
        # The family as a plain number (sock.family builds an enum member on
        # every read).
        inet = _family(sock) in _INET
        remote_ip = address[0] if inet and address else "0.0.0.0"
        protocol = self.protocol
        if self.xheaders:
            # Squid uses X-Forwarded-For, others X-Real-Ip; the last hop not trusted.
            hops = headers.get("X-Forwarded-For", remote_ip).split(",")
            for ip in (hop.strip() for hop in reversed(hops)):
                if ip not in self.trusted_downstream:
                    break
            ip = headers.get("X-Real-Ip", ip)
            if is_valid_ip(ip):
                remote_ip = ip
            scheme = headers.get("X-Scheme", headers.get("X-Forwarded-Proto", protocol))
            scheme = scheme.split(",")[-1].strip() if scheme else scheme
            if scheme in ("http", "https"):
                protocol = scheme
        return RequestContext(address, remote_ip, protocol, inet)


def simple_headers(text: str) -> HTTPHeaders | None:
    """The headers of a head's field lines (after the start line, up to and
    with the blank line), when each line is a simple one ending in CRLF and no
    name comes twice; else ``None``, and ``HTTPHeaders.parse`` decides (as
    Tornado would, merging repeated names or refusing the head).

    Why: ``HTTPHeaders.parse`` checks each line with several regular
    expressions in Python; two searches over the whole block (the names, the
    values) and a dict cost 0.43x of it (four header lines), for the heads
    that browsers and clients send.
    """
    if not text.endswith("\r\n\r\n"):
        return None
    lines = text[:-4].split("\r\n")
    fields = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            return None
        fields[name] = value
    if (
        len({name.lower() for name in fields}) != len(lines)  # a name twice: both kept
        or "" in fields
        or _NAMES.fullmatch("".join(fields)) is None
        or _NOT_IN_VALUE.search("".join(fields.values())) is not None
    ):
        return None
    return HTTPHeaders({name: value.strip(" \t") for name, value in fields.items()})


def _serve(
    request: HTTPServerRequest,
    delegate: StreamRequest,
    start_line: RequestStartLine,
    conn: DirectConnection,
) -> None:
    """Give the request to its endpoint as Tornado's HTTP1Connection would."""
    try:
        pending = delegate.headers_received(start_line, request.headers)
    except Exception:
        log.exception("Uncaught exception while accepting %s", request.uri)
        conn.stream.close()
        return
    if pending is None:
        delegate.finish()  # writes the answer, if the request got one
        return
    # authorize() is async: watch for the client leaving meanwhile (the
    # stream is then closed when the endpoint takes it).
    stream = conn.stream
    stream.set_close_callback(_nothing)
    spawn(_finish_later(delegate, pending, stream), f"accepting {request.uri}")


async def _finish_later(
    delegate: StreamRequest, pending: Awaitable[None], stream: IOStream
) -> None:
    try:
        await pending
    except BaseException:
        stream.close()  # as Tornado's path does: the client is not left waiting
        raise
    delegate.finish()


def _nothing() -> None:
    pass
