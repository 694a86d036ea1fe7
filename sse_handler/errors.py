"""Exceptions raised by sse_handler.

The hierarchy::

    Exception
     └── SSEHandlerError                 base of everything this package raises
          ├── ConnectionClosedError      send()/flush() on a connection that has ended
          └── UnknownConnectionError     (also a KeyError) no connection with that cid

Invalid events are refused with the built-in ``ValueError`` (a field that would
break the wire format) or ``TypeError`` (a ``data`` of an unsupported type), at
construction, never deep inside a write.
"""

from __future__ import annotations


class SSEHandlerError(Exception):
    """Base class of the errors raised by sse_handler."""


class ConnectionClosedError(SSEHandlerError):
    """The connection has ended; nothing more can be sent on it.

    ``reason`` is the close reason (see :class:`sse_handler.CloseReason`).
    """

    def __init__(self, cid: str, reason: str | None = None) -> None:
        self.cid = cid
        self.reason = reason
        super().__init__(f"connection {cid} is closed" + (f" ({reason})" if reason else ""))


class UnknownConnectionError(SSEHandlerError, KeyError):
    """No connection with this cid is registered with the handler."""

    def __init__(self, cid: str) -> None:
        self.cid = cid
        super().__init__(cid)

    def __str__(self) -> str:
        return f"no connection with cid {self.cid!r}"
