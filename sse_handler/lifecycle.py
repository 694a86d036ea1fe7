"""The life of one stream as one value: :class:`State`, and why it ended.

Pure: no I/O, no Tornado. A connection's state changes in exactly one place,
``FrameWriter._enter`` (:mod:`sse_handler.writer`), which checks every change
against :data:`TRANSITIONS`::

    OPENING --> HELD --> LIVE --> DRAINING --> CLOSED
       |          |        |                     ^
       |          +--------+---> DRAINING        |
       +----------+--------+---------------------+

* ``OPENING``: accepted, its channels being subscribed; nothing written yet.
* ``HELD``: the response head is queued and held back while the synchronous
  hooks run, so a welcome event leaves with it in one ``send``.
* ``LIVE``: frames go straight to the socket or through the bounded queue.
* ``DRAINING``: ``stop()`` / shutdown / a finished source: ``send()`` refuses,
  what is queued still goes out (bounded by the write deadline), then it closes.
* ``CLOSED``: the socket is closed; ``connection_closed(reason)`` has run.

The client-gone watch is armed from ``OPENING`` on, and the I/O task starts
the first time a frame has to wait, in any state before ``CLOSED``.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["TRANSITIONS", "CloseReason", "OverflowPolicy", "State"]


class State(IntEnum):
    """Where a connection is in its life; ordered, so ``state < DRAINING`` means
    "still accepts frames"."""

    OPENING = 0
    HELD = 1
    LIVE = 2
    DRAINING = 3
    CLOSED = 4


#: The allowed changes of state; anything else is a bug and raises.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.OPENING: frozenset({State.HELD, State.LIVE, State.DRAINING, State.CLOSED}),
    State.HELD: frozenset({State.LIVE, State.DRAINING, State.CLOSED}),
    State.LIVE: frozenset({State.DRAINING, State.CLOSED}),
    State.DRAINING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class CloseReason(StrEnum):
    """Why a connection ended; passed to ``connection_closed(reason)``."""

    CLIENT_CLOSED = "client_closed"  # the peer closed or reset the TCP connection
    DEAD_PEER = "dead_peer"  # the peer vanished without FIN (keepalive / TCP_USER_TIMEOUT)
    STOPPED = "stopped"  # stop() / handler.stop_one() / stop_all()
    SHUTDOWN = "shutdown"  # handler.shutdown()
    WRITE_ERROR = "write_error"  # the socket refused a write
    TLS_ERROR = "tls_error"  # the TLS layer failed (a protocol error, not a clean close)
    SLOW = "slow"  # the write deadline passed with data still unsent
    OVERFLOW = "overflow"  # the queue bound was hit under the "disconnect" policy
    HOOK_ERROR = "hook_error"  # a hook or poll_data() raised
    BROKER_ERROR = "broker_error"  # the broker could not subscribe the channels or replay
    SOURCE_DONE = "source_done"  # an overridden poll_data() returned None
    MAX_AGE = "max_age"  # max_connection_age reached (the client gets a retry hint)
    AUTH_EXPIRED = "auth_expired"  # the credential expired (event: auth_expired, a retry hint)


class OverflowPolicy(StrEnum):
    """What a full queue does with one more frame."""

    DISCONNECT = "disconnect"  # close the connection; the client resumes by Last-Event-ID
    DROP_OLDEST = "drop_oldest"  # discard queued frames from the front until it fits
    DROP_NEWEST = "drop_newest"  # discard the new frame
