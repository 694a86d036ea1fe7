"""A listening socket whose ``accept()`` costs less Python.

Why: ``socket.socket.accept`` reads the listener's family and type through
properties that build an enum member each time, a few microseconds of every
accepted connection (docs/benchmarks.md, notes). :class:`Listener` makes
the same socket from the plain numbers. :func:`~sse_handler.server.make_server`'s
server gives its plain listening sockets this class (the object stays the
same, only its ``accept`` changes), for the direct accept, where every
accepted connection counts.
"""

from __future__ import annotations

import _socket
import socket
from typing import Any, cast

__all__ = ["Listener", "quick_accept"]


class Listener(socket.socket):
    """``socket.socket`` whose ``accept()`` gives what the standard one gives."""

    __slots__ = ()

    def accept(self) -> tuple[socket.socket, Any]:
        fd, address = self._accept()  # type: ignore[attr-defined]
        # The C socket's own attributes: plain ints, no enum built.
        plain = cast(_socket.socket, super(socket.socket, self))
        sock = socket.socket(plain.family, plain.type, plain.proto, fileno=fd)
        # As the standard accept (CPython issue 7995): without a default
        # timeout, a listener with a timeout gives a blocking socket.
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, address


def quick_accept(sock: socket.socket) -> None:
    """Make ``sock`` a :class:`Listener` if it is a plain ``socket.socket``
    (a subclass is left alone: its own ``accept`` may matter)."""
    if type(sock) is socket.socket:
        sock.__class__ = Listener
