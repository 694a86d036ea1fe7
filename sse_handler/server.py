"""An ``HTTPServer`` with settings fit for event streams.

Tornado waits an hour by default for a request head on a new connection, and
for ever for a request body; a flood of TCP connections that never send a
request, or that send a body a byte at a time, would hold that many sockets
for that long. :func:`make_server` bounds both, and answers a client it turns
away (431 for a head too large, 408 for a body too slow) instead of only
closing its connection.

With ``direct_accept``, stream requests do not go through Tornado's HTTP/1
connection at all: the first request of each new plain connection is peeked
at, and a ``GET`` to a stream endpoint is taken directly (:mod:`sse_handler.accept`, about half the
CPU of an accept); anything else is Tornado's, untouched.

Why the streams themselves are touched: Tornado enforces ``max_header_size``
inside its ``IOStream``, which closes the socket as soon as the bound is
passed; no request (or delegate) exists yet to answer. The server's streams
get a ``close_fd`` that, in that one case, keeps the socket long enough to
write the 431 (``close_fd`` is the hook ``IOStream`` subclasses implement).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, SSLIOStream, UnsatisfiableReadError
from tornado.log import access_log
from tornado.routing import RuleRouter
from tornado.web import Application

from .accept import DirectAccept
from .closing import LINGER_SECONDS, answer_and_close, declares_body, shut_write
from .listener import quick_accept
from .response import Answer
from .routing import EventStreamRoute
from .tasks import log
from .transport import tune_listener

if TYPE_CHECKING:
    from .handler import ServerSentEventHandler

__all__ = ["BoundedHTTPServer", "answer_and_close", "make_server"]


def make_server(
    app: Application,
    *,
    header_timeout: float = 10.0,
    max_header_size: int = 16 * 1024,
    body_timeout: float | None = 10.0,
    direct_accept: bool = True,
    **kwargs: Any,
) -> BoundedHTTPServer:
    """``HTTPServer(app)`` that bounds the request phase of every connection.

    - a connection sending no complete request head within ``header_timeout``
      seconds is closed;
    - a head over ``max_header_size`` bytes gets ``431 Request Header Fields
      Too Large`` and a close;
    - a request body not received within ``body_timeout`` seconds of its head
      gets ``408 Request Timeout`` and a close (``None`` or ``0``: no bound).
      It bounds every route of ``app``: serve large, slow uploads from a
      server of their own, or raise it.

    With ``direct_accept`` (the default), a ``GET`` that opens a stream is
    read off a new connection by :mod:`sse_handler.accept`, not by Tornado's
    HTTP/1 connection (same routing, hooks and answers; a refusal ends with
    ``Connection: close``): about a quarter less CPU per accepted stream.
    Plain TCP and Unix sockets only: over TLS every request is Tornado's.
    ``direct_accept=False`` leaves every request to Tornado.

    With ``direct_accept``, on Linux, the listening TCP sockets get the
    socket options of the application's first stream endpoint (TCP_NODELAY,
    ``kernel_buffer``'s TCP_NOTSENT_LOWAT, ``dead_peer_timeout``'s keepalive
    and TCP_USER_TIMEOUT): every accepted connection inherits them, the
    connections of other routes too, and a stream then checks them with one
    ``getsockopt`` instead of setting seven options.

    Other keywords go to ``HTTPServer``. Once a stream is accepted the
    connection leaves Tornado, so these bounds apply to the request phase only.
    """
    return BoundedHTTPServer(
        app,
        idle_connection_timeout=header_timeout,
        max_header_size=max_header_size,
        body_timeout=body_timeout,
        direct_accept=direct_accept,
        **kwargs,
    )


class BoundedHTTPServer(HTTPServer):
    """The ``HTTPServer`` of :func:`make_server`: 431 for a head over
    ``max_header_size``, 408 for a body slower than ``body_timeout``.

    Takes ``HTTPServer``'s keywords. ``body_timeout`` is enforced here, with a
    408, and not handed to Tornado, whose own only closes the connection.
    """

    body_timeout: float | None
    direct: DirectAccept | None

    def initialize(
        self,
        *args: Any,
        body_timeout: float | None = None,
        direct_accept: bool = True,
        **kwargs: Any,
    ) -> None:
        super().initialize(*args, **kwargs)
        self.body_timeout = body_timeout or None
        self.direct = None
        app = self.request_callback
        if direct_accept and isinstance(app, Application) and self.ssl_options is None:
            self.direct = DirectAccept(
                app,
                self._serve_with_tornado,
                max_header_size=self.conn_params.max_header_size or 65536,
                xheaders=self.xheaders,
                protocol=self.protocol,
                trusted_downstream=self.trusted_downstream,
            )

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        sockets = list(sockets)
        if self.direct is not None:
            self._tune_listeners(sockets)
            for sock in sockets:
                quick_accept(sock)
        super().add_sockets(sockets)

    def _tune_listeners(self, sockets: list[socket.socket]) -> None:
        """Give the listening sockets the options of the application's (first)
        stream endpoint: every accepted socket inherits them, and a stream's
        accept then checks them with one ``getsockopt`` instead of setting
        them with seven (:func:`~sse_handler.transport.tune_socket`)."""
        assert self.direct is not None
        endpoint = _first_stream_endpoint(self.direct.app.default_router)
        if endpoint is None:
            return
        tuning = (endpoint.dead_peer_timeout, endpoint.kernel_buffer)
        # A Unix socket's streams have nothing to tune: their check fails and
        # they go through tune_socket(), which returns at once.
        if any([tune_listener(sock, *tuning) for sock in sockets]):
            self.direct.listener_tuning = tuning

    def _handle_connection(self, connection: socket.socket, address: Any) -> None:
        # TCPServer's callback for each accepted socket, which it wraps in an
        # IOStream for handle_stream(); the direct path takes the socket first.
        if self.direct is not None:
            self.direct.take(connection, address)
            return
        super()._handle_connection(connection, address)

    def _serve_with_tornado(self, connection: socket.socket, address: Any) -> None:
        super()._handle_connection(connection, address)

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        # TCPServer builds the IOStream; a subclass of the same layout that
        # adds only close_fd takes its place before the first read.
        guarded = _GUARDED.get(type(stream))
        if guarded is not None:
            stream.__class__ = guarded
        super().handle_stream(stream, address)

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(request_conn, "stream", None)
        if isinstance(stream, _GuardedIOStream):
            stream.reading_head = True  # Tornado reads the head next
        return _RequestGuard(delegate, request_conn, self.body_timeout)


class _GuardedIOStream(IOStream):
    """The server's IOStream: a 431 when the head was too large.

    ``reading_head`` is set by the server from the start of a request until
    its head is parsed: the one read in that window that has a size bound is
    the head's.
    """

    reading_head = False

    def close_fd(self) -> None:
        if self.reading_head and isinstance(self.error, UnsatisfiableReadError):
            # The stream is closing because the head passed max_header_size.
            sock = self.socket
            self.socket = None  # type: ignore[assignment]
            access_log.warning("431 request head over max_header_size (%s)", _peer(sock))
            # The fd left the IOLoop in close(); a fresh IOStream writes the
            # answer and lingers.
            answer_and_close(IOStream(sock), Answer(431).encode(None))
            return
        super().close_fd()


class _GuardedSSLIOStream(_GuardedIOStream, SSLIOStream):
    pass


_GUARDED: dict[type[IOStream], type[IOStream]] = {
    IOStream: _GuardedIOStream,
    SSLIOStream: _GuardedSSLIOStream,
}


class _RequestGuard(httputil.HTTPMessageDelegate):
    """Wraps the application's delegate for one request: the end of the head,
    and a timer on the body when the request declares one."""

    __slots__ = ("body_timeout", "conn", "delegate", "method", "timed_out", "timer", "uri")

    def __init__(
        self,
        delegate: httputil.HTTPMessageDelegate,
        conn: httputil.HTTPConnection,
        body_timeout: float | None,
    ) -> None:
        self.delegate = delegate
        self.conn = conn
        self.body_timeout = body_timeout
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.method = self.uri = ""

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        stream = getattr(self.conn, "stream", None)
        if isinstance(stream, _GuardedIOStream):
            stream.reading_head = False
        result = self.delegate.headers_received(start_line, headers)
        if not self.body_timeout or not declares_body(headers):
            return result  # nothing to time (every stream's GET)
        assert isinstance(start_line, httputil.RequestStartLine)
        self.method, self.uri = start_line.method, start_line.path
        if result is None:
            self._start_timer()
            return None
        return self._then_start_timer(result)

    async def _then_start_timer(self, result: Awaitable[None]) -> None:
        await result
        self._start_timer()

    def _start_timer(self) -> None:
        # Tornado reads the body from here on, unless the delegate took the
        # connection (a stream, or an answer given without reading the body).
        if getattr(self.conn, "stream", None) is None:
            return
        assert self.body_timeout is not None
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.body_timeout, self._body_timed_out)

    def _body_timed_out(self) -> None:
        self.timer = None
        stream = getattr(self.conn, "stream", None)
        if stream is None or stream.closed():
            return
        self.timed_out = True
        try:
            self.delegate.on_connection_close()
        except Exception:
            log.exception("Uncaught exception in on_connection_close")
        context = getattr(self.conn, "context", None)
        summary = f"{self.method} {self.uri} ({getattr(context, 'remote_ip', '?')})"
        access_log.warning("408 %s: body not received within %ss", summary, self.body_timeout)
        # An application that already began its answer (a streaming body
        # handler) cannot be given another: then only close.
        if getattr(self.conn, "_response_start_line", True) is not None:
            stream.close()
            return
        # Tornado's read of the body goes on meanwhile, into this guard, which
        # drops it: the lingering read; then the close.
        written = stream.write(Answer(408).encode(self.method))
        loop = asyncio.get_running_loop()
        written.add_done_callback(lambda _: shut_write(stream))
        loop.call_later(LINGER_SECONDS, stream.close)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.timed_out:
            return None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self._cancel_timer()
        if not self.timed_out:
            self.delegate.finish()

    def on_connection_close(self) -> None:
        self._cancel_timer()
        if not self.timed_out:
            self.delegate.on_connection_close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _first_stream_endpoint(router: RuleRouter) -> ServerSentEventHandler | None:
    """The handler of the first stream route in ``router``'s rules, nested
    routers included."""
    for rule in router.rules:
        target = rule.target
        if isinstance(target, EventStreamRoute):
            return target.handler
        if isinstance(target, RuleRouter):
            found = _first_stream_endpoint(target)
            if found is not None:
                return found
    return None


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return "?"
