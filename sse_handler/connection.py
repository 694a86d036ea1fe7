"""One connected client: `ServerSentEventConnection`.

The connection is what applications subclass and hold: its identity (cid,
path, address, Last-Event-ID, channels), its hooks (``registered``,
``connection_closed``, ``poll_data``, ``poll_data_immediate``) and its
methods (``send``, ``send_encoded``, ``flush``, ``stop``). Its write path --
state, bounded queue, fast and slow path, I/O task -- is its
:attr:`~ServerSentEventConnection.writer`, a
:class:`~sse_handler.writer.FrameWriter` over the detached socket's transport
(a :class:`~sse_handler.writer.CoalescingWriter` when the handler has a
``coalesce_window``).

It sees its handler only through :class:`ConnectionOwner` (as
``tornado.websocket`` sees its handler only through ``_WebSocketDelegate``) and
its bounds through the frozen :class:`~sse_handler.writer.WriteLimits`.

A subclass that overrides :meth:`ServerSentEventConnection.poll_data` to pull
from its own source (an async generator, a database) gets a source task that
feeds that source into the same write path once the connection is registered,
awaiting ``flush()`` whenever the socket falls behind, so a pull source is
paced by its reader. Frames from ``send()`` (a welcome event, admin messages,
keep-alives) still go out in order of arrival.

Whatever ends the connection -- the client, ``stop()``, shutdown, a write error,
the write deadline, the overflow policy, a failing hook -- the writer closes
once, then ``connection_closed(reason)`` runs, then the owner's
``connection_ended`` (which calls ``on_connection_deregistered``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, Unpack

from tornado.httputil import HTTPHeaders, HTTPServerRequest

from .coalesce import Coalescer
from .errors import ConnectionClosedError
from .event import EventFields, ServerSentEvent, encode_retry, event_frame
from .lifecycle import CloseReason, OverflowPolicy, State  # noqa: F401
from .tasks import cancel, log, spawn
from .writer import CoalescingWriter, FrameWriter, Transport, WriteLimits, chunked_for

# CloseReason and OverflowPolicy are importable from here too (they lived
# here before sse_handler.lifecycle); they are documented there.
__all__ = [
    "ConnectionOwner",
    "ConnectionStats",
    "Sendable",
    "ServerSentEventConnection",
]

Sendable = ServerSentEvent | bytes


class ConnectionOwner(Protocol):
    """What a connection needs of its handler, and nothing more."""

    @property
    def write_limits(self) -> WriteLimits: ...

    @property
    def coalescer(self) -> Coalescer | None:
        """The coalescing window of the handler's streams; ``None``: off."""

    async def subscribe(self, conn: ServerSentEventConnection, channel: str) -> None: ...

    def unsubscribe(self, conn: ServerSentEventConnection, channel: str) -> None: ...

    def connection_ended(self, conn: ServerSentEventConnection) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    """A snapshot of one connection, as the admin API lists it."""

    cid: str
    path: str
    remote_ip: str | None
    connected_at: float
    last_event_id: str | None
    channels: list[str]
    state: str
    queue_depth: int
    queued_bytes: int
    events_sent: int
    bytes_sent: int
    dropped: int


class ServerSentEventConnection:
    """One connected client.

    Created by :meth:`ServerSentEventHandler.get_connection_impl`; subclass it and
    set ``connection_class`` on your handler to add behaviour through the hooks
    :meth:`registered`, :meth:`connection_closed`, :meth:`poll_data` and
    :meth:`poll_data_immediate`.

    Attributes: ``cid`` (unique, short, ASCII), ``handler``, ``path``,
    ``query_arguments``, ``headers`` (the request's headers; after
    registration only those named in the handler's ``kept_headers``),
    ``remote_ip``, ``subject`` and ``auth_expires_at`` (from the
    :class:`~sse_handler.grant.Grant` ``authorize()`` returned, else ``None``),
    ``last_event_id`` (from the ``Last-Event-ID`` header or the
    ``last_event_id`` query parameter, else ``None``), ``connected_at`` (epoch
    seconds), ``channels``, ``close_reason`` (``None`` while open), ``writer``
    (the write path), and the stats: ``events_sent`` (events accepted and not
    dropped: written, or waiting in the queue), ``bytes_sent`` (bytes the
    socket took), ``dropped`` (frames discarded by the overflow policy),
    ``queue_depth``.
    """

    # Slots keep an idle connection small: the goal is a few KB each, so that
    # one process holds tens of thousands of clients.
    __slots__ = (
        "__dict__",  # subclasses may add attributes freely
        "_source_task",
        "auth_expires_at",
        "channels",
        "cid",
        "connected_at",
        "expires_at",
        "handler",
        "headers",
        "last_event_id",
        "path",
        "query_arguments",
        "remote_ip",
        "subject",
        "writer",
    )

    def __init__(
        self,
        handler: ConnectionOwner,
        cid: str,
        transport: Transport,
        request: HTTPServerRequest,
        last_event_id: str | None = None,
    ) -> None:
        self.handler = handler
        self.cid = cid
        # Copied out of the request rather than keeping it: the request holds
        # Tornado's connection objects, which are done with after the head.
        self.path = request.path
        self.query_arguments = request.query_arguments
        self.headers: HTTPHeaders = request.headers
        self.remote_ip = request.remote_ip
        self.last_event_id = last_event_id or None
        #: The channels this connection receives (kept by the handler's router).
        self.channels: set[str] = set()
        #: Monotonic time at which the handler stops it (max_connection_age).
        self.expires_at: float | None = None
        #: Who the credential that opened the stream names (a user id), when
        #: ``authorize()`` returned a :class:`~sse_handler.grant.Grant`; else ``None``.
        self.subject: str | None = None
        #: Epoch seconds at which that credential expires and the handler
        #: stops the stream with ``event: auth_expired`` (``None``: never).
        self.auth_expires_at: float | None = None
        self.connected_at = time.time()
        self._source_task: asyncio.Future[None] | None = None
        chunked = chunked_for(request.version)
        coalescer = handler.coalescer
        # Decided once here, so that the default write path has no check for it.
        self.writer = (
            FrameWriter(
                transport, handler.write_limits, chunked=chunked, name=cid, on_closed=self._closed
            )
            if coalescer is None
            else CoalescingWriter(
                transport,
                handler.write_limits,
                chunked=chunked,
                name=cid,
                on_closed=self._closed,
                coalescer=coalescer,
            )
        )
        if _overrides(self, "poll_data_immediate") and not _overrides(self, "poll_data"):
            self.writer.set_extra(self._immediate_frames)

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> State:
        """Where the connection is in its life (see :class:`~sse_handler.lifecycle.State`)."""
        return self.writer.state

    @property
    def is_active(self) -> bool:
        """True until the connection is stopped or closed."""
        return self.writer.state < State.DRAINING

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended; ``None`` while it is open."""
        return self.writer.close_reason

    @property
    def events_sent(self) -> int:
        return self.writer.events_sent

    @property
    def bytes_sent(self) -> int:
        return self.writer.bytes_sent

    @property
    def dropped(self) -> int:
        return self.writer.dropped

    @property
    def queue_depth(self) -> int:
        """Frames waiting in the queue (not counting a write in flight)."""
        return self.writer.queue_depth

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the queue."""
        return self.writer.queued_bytes

    def stats(self) -> ConnectionStats:
        """A snapshot of this connection (``dataclasses.asdict`` makes it JSON-able)."""
        writer = self.writer
        return ConnectionStats(
            cid=self.cid,
            path=self.path,
            remote_ip=self.remote_ip,
            connected_at=self.connected_at,
            last_event_id=self.last_event_id,
            channels=sorted(self.channels),
            state=writer.state.name.lower(),
            queue_depth=writer.queue_depth,
            queued_bytes=writer.queued_bytes,
            events_sent=writer.events_sent,
            bytes_sent=writer.bytes_sent,
            dropped=writer.dropped,
        )

    def send(self, event: ServerSentEvent | None = None, /, **fields: Unpack[EventFields]) -> None:
        """Send an event: a :class:`ServerSentEvent`, or its fields as keywords.

        ``send(data={"a": 1}, event="update", id="7")``. Invalid fields raise
        ``ValueError`` before anything is queued. Raises
        :class:`ConnectionClosedError` if the connection has ended. Returns at
        once; ``await flush()`` to wait until the bytes are on the socket.
        """
        self.writer.send(event_frame(event, fields))

    def send_encoded(self, frame: bytes) -> None:
        """Send a frame that is already encoded (e.g. shared by many connections).

        The bytes go out as given: no validation, no re-encoding (only the
        HTTP/1.1 chunk framing around them).
        """
        self.writer.send(frame)

    async def flush(self) -> None:
        """Wait until everything sent so far has been handed to the socket.

        Raises :class:`ConnectionClosedError` if the connection ends first.
        """
        await self.writer.flush()

    def stop(
        self,
        farewell: ServerSentEvent | None = None,
        retry: int | None = None,
        *,
        reason: CloseReason = CloseReason.STOPPED,
    ) -> None:
        """End the connection from the server side.

        ``farewell`` (e.g. ``ServerSentEvent(event="close", data="")``) and a
        ``retry`` hint in milliseconds are sent first; the socket is closed once
        they are written (bounded by the write deadline). Further sends raise
        :class:`ConnectionClosedError` at once. ``reason`` is what
        ``connection_closed`` is told.
        """
        last = (encode_retry(retry) if retry is not None else b"") + (
            farewell.encode() if farewell is not None else b""
        )
        self.writer.stop(reason, last)

    def close(self, reason: CloseReason = CloseReason.STOPPED) -> None:
        """Close at once, dropping whatever is still queued."""
        self.writer.close(reason)

    async def subscribe(self, channel: str) -> None:
        """Receive ``channel``'s events from now on (e.g. from ``registered()``)."""
        await self.handler.subscribe(self, channel)

    def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``'s events."""
        self.handler.unsubscribe(self, channel)

    async def wait_closed(self) -> CloseReason:
        """Wait until the connection has ended; returns the close reason."""
        return await self.writer.wait_closed()

    # ------------------------------------------------------------------- hooks

    def registered(self) -> Awaitable[None] | None:
        """Called once the connection is registered (may be ``async``).

        Send a welcome event here. Raising closes this connection only.
        """
        return None

    def connection_closed(self, reason: CloseReason) -> Awaitable[None] | None:
        """Called exactly once when the connection has ended (may be ``async``)."""
        return None

    async def poll_data(self) -> Sendable | None:
        """The connection's own source: wait for and return the next item to write.

        Called only when overridden: once the connection is registered, a
        source task awaits it in a loop, sends each item through the path of
        ``send()`` (size-checked, counted), and awaits ``flush()`` whenever the
        socket falls behind, so the source is paced by its reader. Return an
        event or an encoded frame, or ``None`` to end the stream (the
        connection closes with ``source_done``). ``send()`` keeps working
        beside it.

        Not overridden, it is never called: a frame from ``send()`` goes to the
        socket at once or, when the socket is behind, into the queue that the
        I/O task drains itself. This default would take the next frame off that
        queue, from under the I/O task: an override must not call it.
        """
        return await self.writer.next_frame()

    def poll_data_immediate(self) -> list[Sendable]:
        """What is ready now, without waiting: items appended to the current write.

        Called only when overridden: with an overridden :meth:`poll_data`, by
        the source task after each item it returns; without one, by the I/O
        task once for each batch it writes (its items go after the batch's
        queued frames), which happens only when frames had to wait for the
        socket -- a frame the socket takes at once is written without a batch.
        Either way a burst leaves in one ``send``.

        Not overridden, it is never called: the I/O task takes every queued
        frame itself. This default would take them (and return them) instead.
        """
        return list(self.writer.ready_frames())

    # -------------------------------------------------------------- internals

    def start_source(self) -> None:
        """Start feeding an overridden :meth:`poll_data` (called once registered)."""
        if _overrides(self, "poll_data") and self._source_task is None and self.is_active:
            self._source_task = spawn(self._source_loop(), f"poll_data of {self.cid}")

    def _immediate_frames(self) -> list[bytes]:
        """An overridden poll_data_immediate() as frames: checked like send()."""
        frames = [_encoded(item) for item in self.poll_data_immediate()]
        for frame in frames:
            self.handler.write_limits.check_event_size(frame)
        return frames

    async def _source_loop(self) -> None:
        """Feed an overridden poll_data() into the write path, paced by the reader."""
        custom_immediate = _overrides(self, "poll_data_immediate")
        writer = self.writer
        try:
            while self.is_active:
                item = await self.poll_data()
                if item is None:
                    writer.stop(CloseReason.SOURCE_DONE)
                    return
                items = [item, *self.poll_data_immediate()] if custom_immediate else [item]
                for one in items:
                    writer.send(_encoded(one))
                if writer.pending:
                    await writer.flush()
        except ConnectionClosedError:
            return
        except Exception:
            log.exception("Uncaught exception in poll_data of connection %s", self.cid)
            writer.close(CloseReason.HOOK_ERROR)

    def _closed(self, reason: CloseReason) -> None:
        """The writer has closed: stop the source, run the hooks, leave the handler."""
        cancel(self._source_task)
        try:
            result = self.connection_closed(reason)
        except Exception:
            log.exception("Uncaught exception in connection_closed of connection %s", self.cid)
        else:
            if result is not None and inspect.isawaitable(result):
                spawn(result, f"connection_closed of connection {self.cid}")
        self.handler.connection_ended(self)

    def __repr__(self) -> str:
        state = self.writer.state.name.lower()
        return f"<{type(self).__name__} {self.cid} {self.path} {state}>"


def _overrides(conn: ServerSentEventConnection, name: str) -> bool:
    return getattr(type(conn), name) is not getattr(ServerSentEventConnection, name)


def _encoded(item: Sendable) -> bytes:
    return item if isinstance(item, bytes) else item.encode()
