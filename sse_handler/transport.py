"""The socket of a detached stream, registered with Tornado's IOLoop.

Once a request is accepted the stream leaves Tornado (as ``tornado.websocket``
does after the upgrade: Tornado's per-request objects cost memory and CPU on
every write of a stream that lives for hours) and its socket is wrapped in a
:class:`SocketTransport` -- plain TCP or a Unix socket -- or a
:class:`TLSTransport` -- the ``ssl.SSLSocket`` of an ``SSLIOStream``, whose
TLS session goes on where Tornado's handshake left it.

On plain sockets ``send`` *is* ``socket.send`` (one C-level call per frame);
over TLS it turns ``SSLWantWriteError`` / ``SSLWantReadError`` into "took
nothing", as ``SSLIOStream.write_to_fd`` does. Readiness comes from the
loop's :mod:`~sse_handler.poller` (one epoll for the streams' sockets), not
from Tornado's ``add_handler``, which would add a dispatch table entry, a set
entry and an argument tuple per socket, nor from the asyncio loop's own
``add_reader``, which costs a ``Handle`` and a ``SelectorKey`` per socket.
:meth:`SocketTransport.close` removes the socket from the poller before it
closes it, and turns every later call into a no-op, so nothing touches a
file descriptor number after it is closed (the kernel may already have given
it to another socket).
"""

from __future__ import annotations

import errno
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Protocol, cast

from tornado.httputil import HTTPServerRequest
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream
from tornado.platform.asyncio import BaseAsyncIOLoop

from .lifecycle import CloseReason
from .poller import Poller, poller_for

__all__ = [
    "ClosedTransport",
    "Detachable",
    "SocketDetachable",
    "SocketTransport",
    "TLSTransport",
    "take_transport",
    "tune_listener",
    "tune_socket",
]

# Linux's value where the socket module lacks the name (Python < 3.12 on some builds).
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


#: The settings of :func:`tune_socket`: (dead_peer_timeout, kernel_buffer).
Tuning = tuple[float, int]


class Detachable(Protocol):
    """A request's connection that hands its ``IOStream`` over: Tornado's
    ``HTTP1Connection``."""

    def detach(self) -> IOStream: ...


class SocketDetachable(Protocol):
    """A connection that holds its socket without an ``IOStream``
    (:class:`sse_handler.accept.DirectConnection`): ``None`` if the client left.
    ``listener_tuning``: what its listening socket was tuned with, if it was."""

    listener_tuning: Tuning | None

    def detach_socket(self) -> socket.socket | None: ...


class SocketTransport:
    """A plain TCP or Unix socket of one stream (see the module docstring)."""

    __slots__ = ("_on_gone", "_on_writable", "_poller", "_registered", "closed", "send", "sock")

    sticky_writes = False

    def __init__(self, sock: socket.socket, io_loop: IOLoop | None = None) -> None:
        self.sock = sock
        self.send: Callable[[bytes | memoryview], int] = sock.send
        self.closed = False
        io_loop = io_loop or IOLoop.current()
        # Every IOLoop of Tornado 6 runs on asyncio; its selector_loop is the
        # asyncio loop itself, except on Windows' proactor (a selector thread).
        assert isinstance(io_loop, BaseAsyncIOLoop)
        self._poller: Poller = poller_for(io_loop.selector_loop)
        self._registered = False
        self._on_gone: Callable[[CloseReason], None] | None = None
        self._on_writable: Callable[[], None] | None = None

    def watch(self, on_gone: Callable[[CloseReason], None]) -> None:
        """Watch for the client going away (readable means EOF or RST)."""
        if self.closed:
            return
        self._on_gone = on_gone
        self._poller.add(self.sock.fileno(), self._on_readable)
        self._registered = True

    def want_writable(self, callback: Callable[[], None] | None) -> None:
        if self.closed or not self._registered:
            return
        if (callback is None) == (self._on_writable is None):
            self._on_writable = callback
            return
        self._on_writable = callback
        self._poller.want_writes(self.sock.fileno(), None if callback is None else self._writable)

    def _writable(self) -> None:
        if self._on_writable is not None:
            self._on_writable()

    def _on_readable(self) -> None:
        # A client sends nothing after its request; bytes that do arrive (a
        # pipelined request) are read and discarded.
        try:
            chunk = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(self.gone_reason(exc, CloseReason.CLIENT_CLOSED))
            return
        if not chunk:
            self._gone(CloseReason.CLIENT_CLOSED)

    def _gone(self, reason: CloseReason) -> None:
        if self._on_gone is not None:
            self._on_gone(reason)

    def gone_reason(self, exc: OSError, otherwise: CloseReason) -> CloseReason:
        """ETIMEDOUT on a socket is the kernel giving up on a silent peer."""
        return CloseReason.DEAD_PEER if exc.errno == errno.ETIMEDOUT else otherwise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._registered:
            self._registered = False
            self._poller.remove(self.sock.fileno())
        self._on_gone = self._on_writable = None
        try:
            self.sock.close()
        except OSError:
            pass


class TLSTransport(SocketTransport):
    """The ``ssl.SSLSocket`` of a stream served over TLS.

    A write OpenSSL cannot make until it has read (``SSLWantReadError``: the
    peer started a renegotiation) waits for the socket to be readable, not
    writable: a writable socket would wake the I/O task in a busy loop.
    """

    __slots__ = ("_blocked_on_read",)

    # OpenSSL must be called again with the same bytes after WANT_WRITE.
    sticky_writes = True

    def __init__(self, sock: ssl.SSLSocket, io_loop: IOLoop | None = None) -> None:
        super().__init__(sock, io_loop)
        self.send = self._send_tls
        self._blocked_on_read = False

    def _send_tls(self, data: bytes | memoryview) -> int:
        try:
            return self.sock.send(data)
        except ssl.SSLWantWriteError:
            return 0
        except ssl.SSLWantReadError:
            self._blocked_on_read = True
            return 0

    def want_writable(self, callback: Callable[[], None] | None) -> None:
        if callback is not None and self._blocked_on_read and not self.closed:
            self._on_writable = callback  # called from _on_readable instead
            return
        super().want_writable(callback)

    def _on_readable(self) -> None:
        try:
            chunk = self.sock.recv(4096)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            chunk = None  # a partial record, or TLS's own traffic: no data yet
        except OSError as exc:
            self._gone(self.gone_reason(exc, CloseReason.CLIENT_CLOSED))
            return
        if chunk == b"":
            self._gone(CloseReason.CLIENT_CLOSED)
            return
        if self._blocked_on_read:
            self._blocked_on_read = False
            if self._on_writable is not None:
                self._on_writable()

    def gone_reason(self, exc: OSError, otherwise: CloseReason) -> CloseReason:
        if isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError):
            return CloseReason.CLIENT_CLOSED  # close_notify, or EOF without it
        if isinstance(exc, ssl.SSLError):
            return CloseReason.TLS_ERROR
        return super().gone_reason(exc, otherwise)


class ClosedTransport:
    """The transport of a client that left before its stream was taken over:
    its connection is created and closed at once, so that every request that
    passed ``authorize()`` gets exactly one ``connection_closed`` and one
    ``on_connection_deregistered``."""

    __slots__ = ()

    sticky_writes = False
    closed = True

    def send(self, data: bytes | memoryview) -> int:
        raise BrokenPipeError(errno.EPIPE, "the client left before the stream began")

    def watch(self, on_gone: Callable[[CloseReason], None]) -> None:
        pass

    def want_writable(self, callback: Callable[[], None] | None) -> None:
        pass

    def gone_reason(self, exc: OSError, otherwise: CloseReason) -> CloseReason:
        return CloseReason.CLIENT_CLOSED

    def close(self) -> None:
        pass


def take_transport(
    request: HTTPServerRequest, dead_peer_timeout: float = 0.0, kernel_buffer: int = 0
) -> SocketTransport | ClosedTransport:
    """Detach the stream from Tornado and wrap its socket.

    The socket object itself is taken (not a duplicate of its fd): a TLS
    session cannot be duplicated, and the plain case saves the ``dup`` and the
    ``getsockopt`` calls of a new socket object. Tornado's ``IOStream`` is
    unregistered from the IOLoop and dropped; after ``detach()`` its server
    connection has forgotten it, so nothing Tornado does later (closing its
    remaining connections) reaches this socket.
    """
    conn = request.connection
    # (hasattr, not a runtime-checked Protocol: isinstance() of one costs microseconds)
    if hasattr(conn, "detach_socket"):
        # accept.DirectConnection: the socket as accepted, no IOStream made.
        direct = cast(SocketDetachable, conn)
        sock = direct.detach_socket()
        if sock is None:
            return ClosedTransport()
        io_loop = IOLoop.current()
        inherited = direct.listener_tuning
    else:
        # Tornado's HTTP1Connection hands over its IOStream.
        stream = cast(Detachable, conn).detach()
        if stream.closed():
            return ClosedTransport()
        sock = stream.socket
        io_loop = stream.io_loop
        io_loop.remove_handler(sock.fileno())
        inherited = None
    tune_socket(sock, dead_peer_timeout, kernel_buffer, inherited)
    if isinstance(sock, ssl.SSLSocket):
        return TLSTransport(sock, io_loop)
    return SocketTransport(sock, io_loop)


def tune_socket(
    sock: socket.socket,
    dead_peer_timeout: float,
    kernel_buffer: int = 0,
    inherited: Tuning | None = None,
) -> None:
    """TCP_NODELAY, a bound on unsent bytes in the kernel, and dead-peer detection.

    ``kernel_buffer`` sets TCP_NOTSENT_LOWAT: the kernel then takes no more
    from a stream whose reader has that much unsent, so a frozen reader holds
    at most the queue bound plus this in the server, and meets the write
    deadline instead of filling a multi-megabyte autotuned buffer.

    TCP keepalive probes catch a dead peer on an idle stream; TCP_USER_TIMEOUT
    catches it while unacknowledged data is outstanding. Both are set from one
    timeout; the probes start at a third of it so the peer is gone well within.

    ``inherited``: the settings the listening socket was tuned with
    (:func:`tune_listener`). Linux gives an accepted socket its listener's
    options, so when they are the ones wanted, one ``getsockopt`` of the
    last option set confirms it (a connection established before the
    listener was tuned has none) instead of seven ``setsockopt``.
    """
    wanted = (dead_peer_timeout, kernel_buffer)
    if inherited == wanted and _has_tuning(sock, dead_peer_timeout, kernel_buffer):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return  # not TCP (a Unix socket): nothing to tune
    if kernel_buffer:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, kernel_buffer)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, kernel_buffer)
    elif inherited is not None and inherited[1]:
        # The listener's bound, taken back: 0 is the system's default.
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 0)
    if not dead_peer_timeout:
        if inherited is not None and inherited[0]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, 0)
        return
    idle = max(1, int(dead_peer_timeout / 3))
    interval = max(1, int(dead_peer_timeout / 9))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(dead_peer_timeout * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # Linux has all four; other systems some
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def tune_listener(sock: socket.socket, dead_peer_timeout: float, kernel_buffer: int) -> bool:
    """Tune a listening TCP socket as :func:`tune_socket` tunes a stream's, so
    that the streams accepted from it inherit the options (Linux only: other
    systems differ in what an accepted socket inherits). True if it was."""
    if sys.platform != "linux" or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        tune_socket(sock, dead_peer_timeout, kernel_buffer)
    except OSError:
        return False
    return True


def _has_tuning(sock: socket.socket, dead_peer_timeout: float, kernel_buffer: int) -> bool:
    """Does ``sock`` have the last option :func:`tune_socket` would set?"""
    try:
        if dead_peer_timeout:
            got = sock.getsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT)
            return bool(got == int(dead_peer_timeout * 1000))
        if kernel_buffer:
            return bool(sock.getsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT) == kernel_buffer)
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return False
