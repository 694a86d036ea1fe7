"""Brokers: where channel events go between ``publish`` and the connections.

A handler hands ``publish(channel, event)`` to its broker. The broker assigns
the id (unless the caller gave one), keeps a bounded history for replay, and
delivers the event to every process that subscribed to the channel -- including
the publishing one -- through the listener the handler registered. Each process
then encodes once and writes the same bytes to its local subscribers.

* :class:`~sse_handler.brokers.memory.MemoryBroker` -- the default: one process,
  no configuration.
* :class:`~sse_handler.brokers.redis.RedisBroker` -- Redis Streams: fan-out
  across processes and hosts, and history shared by all of them (extra
  ``sse_handler[redis]``).

Ids are short ASCII strings, monotonic per channel. Replay compares positions
with :meth:`Broker.position`, so a hand-off from history to live events can
drop what it already sent.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import SSEHandlerError
from ..event import ServerSentEvent

__all__ = [
    "Broker",
    "BrokerUnavailableError",
    "Delivery",
    "Listener",
    "Replay",
    "body_frame",
]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event of a channel, as a broker hands it to a process."""

    channel: str
    id: str
    #: A sortable position (see :meth:`Broker.position`).
    position: Any
    #: The whole frame, id line included, ready for the socket.
    frame: bytes


Listener = Callable[[Delivery], None]


@dataclass(slots=True)
class Replay:
    """What a client missed: the events after its cursor, or a reset."""

    deliveries: list[Delivery] = field(default_factory=list)
    #: Why the cursor could not be honoured (``"unknown_id"`` or
    #: ``"history_exceeded"``), else ``None``.
    reset: str | None = None
    #: The position of the client's cursor, when the broker found it: the
    #: client has every event up to there. Live events at or before it are
    #: not sent again -- a process whose reader lags behind the client (it
    #: read its last event from another process) may deliver them after the
    #: replay. ``None``: the router knows only the events the replay sent.
    after: Any = None


class BrokerUnavailableError(SSEHandlerError):
    """The broker cannot be reached (e.g. Redis is down or does not answer).

    ``published`` is ``False`` when the event was certainly not stored (the
    connection failed), ``None`` when that is unknown: a command that timed
    out may still run when a paused or slow broker catches up. Either way the
    caller may publish again; a subscriber never gets one stored event twice.
    """

    def __init__(self, message: str, published: bool | None = False) -> None:
        super().__init__(message)
        self.published = published


class Broker(Protocol):
    """What a handler needs from a broker."""

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every event of the channels this process subscribed."""

    async def publish(self, channel: str, event: ServerSentEvent) -> str:
        """Store and fan out one event; returns its id."""

    async def subscribe(self, channel: str) -> None:
        """Start delivering ``channel``'s events published from now on."""

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering ``channel``'s events to this process."""

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        """The events of ``channels`` after ``last_event_id``, oldest first."""

    def position(self, event_id: str) -> Any | None:
        """A sortable position for an id this broker assigned, else ``None``."""

    async def close(self) -> None:
        """Stop background work and release connections."""


def body_frame(event_id: str, body: bytes, caller_id: bool) -> bytes:
    """The frame on the wire: the broker's id line, then the stored body.

    When the caller gave an id it is already in the body. Otherwise the id line
    goes first; the order of fields within an event does not matter to a
    parser, and prepending costs one concatenation per event per process.
    """
    if caller_id:
        return body
    return b"id: " + event_id.encode("ascii") + b"\n" + body
