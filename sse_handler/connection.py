"""One client's write path: `ServerSentEventConnection`.

The connection owns its socket once the response head is written (the Tornado
request machinery is detached, as `tornado.websocket` does after the upgrade),
a bounded queue of encoded frames and an I/O task.

Fast path and slow path -- one mechanism, two speeds:

* ``send()`` / ``send_encoded()`` (and the handler's fan-out) hand a frame to
  ``_push()``. When the queue is empty and no write is in flight, the frame
  goes straight to the socket with one non-blocking ``send``: no task switch,
  no future. That is the common case for a reader that keeps up.
* Otherwise (the kernel buffer is full, or a write is already waiting) the frame
  is appended to the bounded queue. The I/O task (started the first time a
  connection needs one) takes it with
  :meth:`poll_data`, adds everything else that is ready with
  :meth:`poll_data_immediate` (so a burst becomes one ``send``), and waits for
  writability under the write deadline.

A subclass that overrides :meth:`poll_data` to pull from its own source (an
async generator, a database) gets a second task that feeds that source into the
same path, awaiting :meth:`flush` whenever the socket falls behind, so a pull
source is paced by its reader. Frames from ``send()`` (a welcome event, admin
messages, keep-alives) still go out in order of arrival.

Whatever ends the connection -- the client, ``stop()``, shutdown, a write error,
the write deadline, the overflow policy, a failing hook -- ``_close`` runs once,
then ``connection_closed(reason)``, then the handler's
``on_connection_deregistered``.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import inspect
import logging
import socket
import time
from collections.abc import Awaitable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from tornado.httputil import HTTPHeaders, HTTPServerRequest

from .errors import ConnectionClosedError
from .event import ServerSentEvent, encode_retry

if TYPE_CHECKING:
    from .brokers import Delivery
    from .handler import ServerSentEventHandler

__all__ = ["CloseReason", "OverflowPolicy", "ServerSentEventConnection"]

log = logging.getLogger("sse_handler")

# Errors from a non-blocking send that mean "the peer is gone", as opposed to
# BlockingIOError ("the kernel buffer is full, try later").
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError)

# What registration holds behind the head at most before writing it anyway: a
# registered() hook that sends a large snapshot must not wait on the cork.
_CORK_LIMIT = 64 * 1024


class CloseReason(StrEnum):
    """Why a connection ended; passed to ``connection_closed(reason)``."""

    CLIENT_CLOSED = "client_closed"  # the peer closed or reset the TCP connection
    DEAD_PEER = "dead_peer"  # the peer vanished without FIN (keepalive / TCP_USER_TIMEOUT)
    STOPPED = "stopped"  # stop() / handler.stop_one() / stop_all()
    SHUTDOWN = "shutdown"  # handler.shutdown()
    WRITE_ERROR = "write_error"  # the socket refused a write
    SLOW = "slow"  # the write deadline passed with data still unsent
    OVERFLOW = "overflow"  # the queue bound was hit under the "disconnect" policy
    HOOK_ERROR = "hook_error"  # a hook or poll_data() raised
    BROKER_ERROR = "broker_error"  # the broker could not subscribe the channels
    SOURCE_DONE = "source_done"  # an overridden poll_data() returned None
    MAX_AGE = "max_age"  # max_connection_age reached (the client gets a retry hint)


def _gone_reason(exc: OSError, otherwise: CloseReason) -> CloseReason:
    """ETIMEDOUT on a socket is the kernel giving up on a silent peer."""
    return CloseReason.DEAD_PEER if exc.errno == errno.ETIMEDOUT else otherwise


class OverflowPolicy(StrEnum):
    """What a full queue does with one more frame."""

    DISCONNECT = "disconnect"  # close the connection; the client resumes by Last-Event-ID
    DROP_OLDEST = "drop_oldest"  # discard queued frames from the front until it fits
    DROP_NEWEST = "drop_newest"  # discard the new frame


Sendable = ServerSentEvent | bytes


class ServerSentEventConnection:
    """One connected client.

    Created by :meth:`ServerSentEventHandler.get_connection_impl`; subclass it and
    set ``connection_class`` on your handler to add behaviour through the hooks
    :meth:`registered`, :meth:`connection_closed`, :meth:`poll_data` and
    :meth:`poll_data_immediate`.

    Attributes: ``cid`` (unique, short, ASCII), ``handler``, ``path``,
    ``query_arguments``, ``headers``, ``remote_ip``, ``last_event_id`` (from the
    ``Last-Event-ID`` header or the ``last_event_id`` query parameter, else
    ``None``), ``connected_at`` (epoch seconds), ``close_reason`` (``None``
    while active), and the stats: ``events_sent`` (events accepted by send()
    and not dropped: written, or waiting in the queue), ``bytes_sent`` (bytes
    the socket took), ``dropped`` (frames discarded by the overflow policy),
    ``queue_depth``.
    """

    # Slots keep an idle connection small: the goal is a few KB each, so that
    # one process holds tens of thousands of clients.
    __slots__ = (
        "__dict__",  # subclasses may add attributes freely
        "_closed_waiter",
        "_closing",
        "_corked",
        "_dropped_bytes",
        "_expires_at",
        "_fd",
        "_flush_waiters",
        "_head_partial",
        "_held",
        "_inflight",
        "_io_task",
        "_loop",
        "_open",
        "_queue",
        "_queued_bytes",
        "_quiet",
        "_replayed_upto",
        "_sock",
        "_source_task",
        "_started",
        "_wakeup",
        "_writing",
        "bytes_sent",
        "channels",
        "cid",
        "close_reason",
        "connected_at",
        "dropped",
        "events_sent",
        "handler",
        "headers",
        "last_event_id",
        "path",
        "query_arguments",
        "remote_ip",
    )

    def __init__(
        self,
        handler: ServerSentEventHandler,
        cid: str,
        sock: socket.socket,
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
        #: The channels this connection receives (see handler.publish).
        self.channels: set[str] = set()
        # Live channel events held while the replay is read, and the position
        # of the last replayed one (DESIGN: replay hand-off).
        self._held: list[Delivery] | None = None
        self._replayed_upto: Any = None
        # Monotonic deadline set by the handler's max_connection_age.
        self._expires_at: float | None = None
        self.connected_at = time.time()
        self.events_sent = 0
        self.bytes_sent = 0
        self.dropped = 0
        self.close_reason: CloseReason | None = None
        # False once stop() began or the connection closed: send() refuses.
        self._open = True
        # Ticks of the handler's keep-alive timer since the last write: a
        # counter reset on the hot path costs less than reading the clock.
        self._quiet = 0
        self._loop = handler._loop or asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        # True while the queue's head is the rest of a frame the socket took
        # only part of: it must go out whole, so drop_oldest never drops it.
        self._head_partial = False
        # True while the I/O task has a batch in flight: send() must queue.
        self._writing = False
        # True while registration holds the head back (see _cork).
        self._corked = False
        self._wakeup: asyncio.Future[None] | None = None
        self._closing: CloseReason | None = None
        self._closed_waiter: asyncio.Future[None] | None = None
        self._io_task: asyncio.Task[None] | None = None
        self._started = False
        self._source_task: asyncio.Task[None] | None = None
        # flush() bookkeeping, kept off the fast path: bytes left of the batch
        # being written, and bytes drop_oldest discarded after accepting them.
        self._inflight = 0
        self._dropped_bytes = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # ------------------------------------------------------------------ public

    @property
    def is_active(self) -> bool:
        """True until the connection is stopped or closed."""
        return self._open

    @property
    def queue_depth(self) -> int:
        """Frames waiting in the queue (not counting a write in flight)."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the queue."""
        return self._queued_bytes

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot, as the admin API lists it."""
        return {
            "cid": self.cid,
            "path": self.path,
            "remote_ip": self.remote_ip,
            "connected_at": self.connected_at,
            "last_event_id": self.last_event_id,
            "channels": sorted(self.channels),
            "queue_depth": len(self._queue),
            "queued_bytes": self._queued_bytes,
            "events_sent": self.events_sent,
            "bytes_sent": self.bytes_sent,
            "dropped": self.dropped,
        }

    def send(self, event: ServerSentEvent | None = None, /, **fields: Any) -> None:
        """Send an event: a :class:`ServerSentEvent`, or its fields as keywords.

        ``send(data={"a": 1}, event="update", id="7")``. Invalid fields raise
        ``ValueError`` before anything is queued. Raises
        :class:`ConnectionClosedError` if the connection has ended. Returns at
        once; ``await flush()`` to wait until the bytes are on the socket.
        """
        self.send_encoded(event_frame(event, fields))

    def send_encoded(self, frame: bytes) -> None:
        """Send a frame that is already encoded (e.g. shared by many connections).

        The bytes go out as given: no validation, no re-encoding.
        """
        if not self._open:
            raise ConnectionClosedError(self.cid, self.close_reason or self._closing)
        if self.handler.max_event_size:
            self.handler.check_event_size(frame)
        self._deliver(frame)

    def _deliver(self, frame: bytes) -> None:
        """``send_encoded`` for fan-out loops: the size was checked once for all,
        and a connection that has just ended is skipped, not an error."""
        if self._open and self._push(frame):
            self.events_sent += 1

    async def flush(self) -> None:
        """Wait until everything sent so far has been handed to the socket.

        Raises :class:`ConnectionClosedError` if the connection ends first.
        """
        if self.close_reason is not None:
            raise ConnectionClosedError(self.cid, self.close_reason)
        if self._corked:
            self._uncork()
            if self.close_reason is not None:
                raise ConnectionClosedError(self.cid, self.close_reason)
        if not self._queue and not self._writing:
            return  # nothing waits: everything sent so far is on the socket
        # Settled = written or dropped; wait until what is pending now is.
        target = self._settled() + self._queued_bytes + self._inflight
        fut: asyncio.Future[None] = self._loop.create_future()
        self._flush_waiters.append((target, fut))
        await fut

    def stop(self, farewell: ServerSentEvent | None = None, retry: int | None = None) -> None:
        """End the connection from the server side.

        ``farewell`` (e.g. ``ServerSentEvent(event="close", data="")``) and a
        ``retry`` hint in milliseconds are sent first; the socket is closed once
        they are written (bounded by the write deadline). Further sends raise
        :class:`ConnectionClosedError` at once.
        """
        self._stop(CloseReason.STOPPED, farewell, retry)

    async def subscribe(self, channel: str) -> None:
        """Receive ``channel``'s events from now on (e.g. from ``registered()``)."""
        await self.handler.router.subscribe(self, channel)

    def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``'s events."""
        self.handler.router.unsubscribe(self, channel)

    async def wait_closed(self) -> CloseReason:
        """Wait until the connection has ended; returns the close reason."""
        if self.close_reason is None:
            if self._closed_waiter is None:
                self._closed_waiter = self._loop.create_future()
            await asyncio.shield(self._closed_waiter)
        assert self.close_reason is not None
        return self.close_reason

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
        """The I/O task's source: wait for and return the next item to write.

        The default returns the next frame from the queue that ``send()`` fills.
        Override it to pull from elsewhere; return an event or an encoded frame,
        or ``None`` to end the stream (the connection closes with
        ``source_done``).
        """
        return await self._next_frame()

    def poll_data_immediate(self) -> list[Sendable]:
        """What is ready now, without waiting; appended to the current write.

        The default takes every frame left in the queue, so a burst that piled
        up behind a slow socket leaves in one ``send``.
        """
        return list(self._ready_frames())

    # -------------------------------------------------------------- internals

    async def _next_frame(self) -> bytes:
        while not self._queue:
            self._wakeup = self._loop.create_future()
            await self._wakeup
        frame = self._queue.popleft()
        self._queued_bytes -= len(frame)
        self._head_partial = False
        return frame

    def _ready_frames(self) -> list[bytes]:
        if not self._queue:
            return []
        frames = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._head_partial = False
        return frames

    def _has_custom_source(self) -> bool:
        return type(self).poll_data is not ServerSentEventConnection.poll_data

    def _start(self) -> None:
        """Watch the socket for EOF; the I/O task follows (called by the handler).

        The I/O task is started the first time a frame has to wait in the
        queue, and then stays: a reader that always keeps up never needs one,
        which saves its memory and the cost of starting it on every accept.
        """
        self._uncork()
        if self.close_reason is not None:
            return
        self._started = True
        self._loop.add_reader(self._fd, self._on_readable)
        if self._queue:
            self._io_task = self._loop.create_task(self._io_loop())
        if self._has_custom_source():
            self._source_task = self._loop.create_task(self._source_loop())

    def _settled(self) -> int:
        return self.bytes_sent + self._dropped_bytes

    def _push(self, frame: bytes, bounded: bool = True) -> bool:
        """Write now if nothing waits, else queue; False if the frame was dropped."""
        if not self._queue and not self._writing:
            # Fast path: nothing is waiting, so nothing can be overtaken.
            try:
                sent = self._sock.send(frame)
            except BlockingIOError:
                sent = 0
            except _GONE as exc:
                self._close(_gone_reason(exc, CloseReason.WRITE_ERROR))
                return False
            self.bytes_sent += sent
            self._quiet = 0
            if sent != len(frame):
                self._queue_rest(frame, sent)
            return True
        if self._corked:
            # Behind the held head: as good as written, so outside the bounds.
            self._queue.append(frame)
            self._queued_bytes += len(frame)
            if self._queued_bytes >= _CORK_LIMIT:
                self._uncork()
            return True
        if bounded and not self._fits(len(frame)):
            return False
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        self._wake()
        return True

    def _cork(self, head: bytes) -> None:
        """Hold the response head back, and what is sent behind it, until
        :meth:`_uncork`: the head and a welcome event sent from ``registered()``
        leave in one ``send``, one system call and one packet instead of two.
        """
        self._corked = True
        self._queue.append(head)
        self._queued_bytes += len(head)

    def _uncork(self) -> None:
        """Write what the cork held, in one call; what the kernel does not take
        heads the queue like any partly written frame."""
        if not self._corked:
            return
        self._corked = False
        if self._queue and self.close_reason is None:
            held = b"".join(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._push(held, bounded=False)

    def _ping(self, frame: bytes) -> None:
        """A keep-alive comment, only if nothing else is on its way."""
        if not self._queue and not self._writing:
            self._push(frame)

    def _queue_rest(self, frame: bytes, sent: int) -> None:
        """The kernel took part of a frame (or none): the rest heads the queue
        and the I/O task finishes it when the socket drains."""
        if sent:
            frame = frame[sent:]
            self._head_partial = True
        self._queue.appendleft(frame)
        self._queued_bytes += len(frame)
        self._wake()

    def _fits(self, size: int) -> bool:
        """Apply the queue bounds and the overflow policy to one more frame."""
        handler = self.handler
        max_messages = handler.max_queue_messages
        max_bytes = handler.max_queue_bytes
        if len(self._queue) < max_messages and self._queued_bytes + size <= max_bytes:
            return True
        policy = handler.overflow_policy
        if policy == OverflowPolicy.DROP_NEWEST:
            self.dropped += 1
            return False
        if policy == OverflowPolicy.DROP_OLDEST:
            queue = self._queue
            keep = 1 if self._head_partial else 0
            while len(queue) > keep and (
                len(queue) >= max_messages or self._queued_bytes + size > max_bytes
            ):
                oldest = queue[keep]
                del queue[keep]
                self._queued_bytes -= len(oldest)
                self._dropped_bytes += len(oldest)
                self.dropped += 1
                self.events_sent -= 1
            if self._flush_waiters:
                self._resolve_flush_waiters()
            if self._queued_bytes + size <= max_bytes:
                return True
            self.dropped += 1
            return False
        self.dropped += 1 + len(self._queue)
        self.events_sent -= len(self._queue)
        self._close(CloseReason.OVERFLOW)
        return False

    def _wake(self) -> None:
        if self._io_task is None:
            if self._started and self.close_reason is None:
                self._io_task = self._loop.create_task(self._io_loop())
            return
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _io_loop(self) -> None:
        # The I/O task always drains the queue. With a custom poll_data() that
        # source runs in _source_loop and reaches the queue through _push; an
        # override of poll_data_immediate() alone still adds to each batch.
        custom_immediate = not self._has_custom_source() and (
            type(self).poll_data_immediate is not ServerSentEventConnection.poll_data_immediate
        )
        try:
            while True:
                frames: list[Sendable] = [await self._next_frame()]
                frames += self.poll_data_immediate() if custom_immediate else self._ready_frames()
                await self._write([_encoded(f) for f in frames])
                if self._closing is not None and not self._queue:
                    self._close(self._closing)
                    return
        except asyncio.CancelledError:
            raise
        except _Closed:
            return
        except Exception:
            log.exception("Uncaught exception in the I/O task of connection %s", self.cid)
            self._close(CloseReason.HOOK_ERROR)

    async def _source_loop(self) -> None:
        """Feed an overridden poll_data() into the write path, paced by the reader."""
        custom_immediate = (
            type(self).poll_data_immediate is not ServerSentEventConnection.poll_data_immediate
        )
        try:
            while self.is_active:
                item = await self.poll_data()
                if item is None:
                    self._stop(CloseReason.SOURCE_DONE, None, None)
                    return
                items = [item, *self.poll_data_immediate()] if custom_immediate else [item]
                for one in items:
                    if not self.is_active:
                        return
                    self._push(_encoded(one))
                if self._queue or self._writing:
                    await self.flush()
        except asyncio.CancelledError:
            raise
        except ConnectionClosedError:
            return
        except Exception:
            log.exception("Uncaught exception in poll_data of connection %s", self.cid)
            self._close(CloseReason.HOOK_ERROR)

    async def _write(self, frames: list[bytes]) -> None:
        """Write one batch, waiting for writability under the write deadline."""
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        view = memoryview(data)
        deadline: float | None = None
        self._writing = True
        self._inflight = len(view)
        try:
            while view:
                try:
                    sent = self._sock.send(view)
                except BlockingIOError:
                    sent = 0
                except _GONE as exc:
                    self._close(_gone_reason(exc, CloseReason.WRITE_ERROR))
                    raise _Closed from None
                if sent:
                    self.bytes_sent += sent
                    self._quiet = 0
                    view = view[sent:]
                    self._inflight = len(view)
                if view:
                    if deadline is None and self.handler.write_timeout:
                        # One deadline for the whole batch: a reader that
                        # trickles a byte at a time is as stuck as a frozen one.
                        deadline = self._loop.time() + self.handler.write_timeout
                    await self._writable(deadline)
        finally:
            self._writing = False
            self._inflight = 0
        if self._flush_waiters:
            self._resolve_flush_waiters()

    async def _writable(self, deadline: float | None) -> None:
        """Wait until the socket takes more; past ``deadline`` the reader is too slow."""
        loop = self._loop
        fut: asyncio.Future[object] = loop.create_future()
        loop.add_writer(self._fd, _set_result_once, fut, None)
        timer = (
            None if deadline is None else loop.call_at(deadline, _set_result_once, fut, _TIMED_OUT)
        )
        try:
            await fut
        finally:
            loop.remove_writer(self._fd)
            if timer is not None:
                timer.cancel()
        if fut.result() is _TIMED_OUT:
            self._close(self._closing or CloseReason.SLOW)
            raise _Closed

    def _on_readable(self) -> None:
        # A client sends nothing after its request; readable means EOF or RST.
        # Bytes that do arrive (a pipelined request) are read and discarded.
        try:
            chunk = self._sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close(self._closing or _gone_reason(exc, CloseReason.CLIENT_CLOSED))
            return
        if not chunk:
            self._close(self._closing or CloseReason.CLIENT_CLOSED)

    def _resolve_flush_waiters(self, exc: BaseException | None = None) -> None:
        written = self._settled()
        keep = []
        for target, fut in self._flush_waiters:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            elif target <= written:
                fut.set_result(None)
            else:
                keep.append((target, fut))
        self._flush_waiters = keep

    def _stop(
        self, reason: CloseReason, farewell: ServerSentEvent | None, retry: int | None
    ) -> None:
        if not self.is_active:
            return
        self._uncork()
        # From here on send() refuses; what is queued still goes out.
        self._closing = reason
        self._open = False
        frame = (encode_retry(retry) if retry is not None else b"") + (
            farewell.encode() if farewell is not None else b""
        )
        if frame:
            # The farewell ignores the queue bounds: it is the last frame.
            self._push(frame, bounded=False)
        if self.close_reason is None and not self._queue and not self._writing:
            self._close(reason)

    def _close(self, reason: CloseReason) -> None:
        """End the connection; runs its effects exactly once."""
        if self.close_reason is not None:
            return
        self._uncork()  # the head, at least, so the client sees a response
        if self.close_reason is not None:
            return  # writing it found the client gone: closed for that reason
        self.close_reason = reason
        self._open = False
        self._closing = None
        loop = self._loop
        loop.remove_reader(self._fd)
        loop.remove_writer(self._fd)
        try:
            self._sock.close()
        except OSError:
            pass
        current = asyncio.current_task(loop) if loop.is_running() else None
        for task in (self._io_task, self._source_task):
            if task is not None and task is not current and not task.done():
                task.cancel()
        self._wake()
        self._queue.clear()
        self._queued_bytes = 0
        self._head_partial = False
        self._resolve_flush_waiters(ConnectionClosedError(self.cid, reason))
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        self._run_hook(self.connection_closed, reason)
        self.handler._deregister(self)

    def _run_hook(self, hook: Any, *args: Any) -> None:
        try:
            result = hook(*args)
        except Exception:
            log.exception("Uncaught exception in %s of connection %s", hook.__name__, self.cid)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(self._log_hook_task)

    def _log_hook_task(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "Uncaught exception in a hook of connection %s",
                self.cid,
                exc_info=task.exception(),
            )

    def __repr__(self) -> str:
        state = self.close_reason or ("closing" if self._closing else "active")
        return f"<{type(self).__name__} {self.cid} {self.path} {state}>"


def _encoded(item: Sendable) -> bytes:
    return item if isinstance(item, bytes) else item.encode()


def as_event(event: ServerSentEvent | None, fields: dict[str, Any]) -> ServerSentEvent:
    """An event given as an object or as keyword fields (not both)."""
    if event is None:
        return ServerSentEvent(**fields)
    if fields:
        raise TypeError("give an event or its fields as keywords, not both")
    return event


def event_frame(event: ServerSentEvent | None, fields: dict[str, Any]) -> bytes:
    """The frame of an event given as an object or as keyword fields."""
    return as_event(event, fields).encode()


class _Closed(Exception):
    """Internal: the connection closed under the I/O task."""


_TIMED_OUT = object()


def _set_result_once(fut: asyncio.Future[object], value: object) -> None:
    if not fut.done():
        fut.set_result(value)
