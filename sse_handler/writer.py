"""One stream's write path: state, bounded queue, overflow, batching, flush.

No Tornado and no handler here: a :class:`FrameWriter` talks to its socket
through a :class:`Transport` (``sse_handler.transport`` has the real ones; the
unit tests script a fake) and is told its bounds by a frozen
:class:`WriteLimits`. That keeps every branch of the write path testable byte
by byte without a network.

Fast path and slow path -- one mechanism, two speeds:

* A frame handed to :meth:`FrameWriter.deliver` / :meth:`FrameWriter.send`
  while the queue is empty and no batch is in flight goes straight to the
  socket with one non-blocking ``send``: no task switch, no future. That is the
  common case for a reader that keeps up.
* Otherwise (the kernel took only part, or a batch is already waiting) the frame
  is appended to the bounded queue. The I/O task, started the first time a
  frame has to wait and kept from then on, takes everything queued as one
  batch (one ``send``) and waits for writability under the write deadline.
  Order is always preserved.

What a refused write leaves: the rest of a partly written frame heads the
queue *pinned*: it must go out whole, so ``drop_oldest`` never drops it. Over
TLS a write the socket refused (``SSLWantWriteError``) is pinned too, because
OpenSSL must be called again with the same bytes first.

The coalesced path (a handler's ``coalesce_window``, off by default) is the
third speed, chosen once per stream when it is built: a
:class:`CoalescingWriter` writes nothing of a live stream at once. A frame that
would take the fast path, and every frame after it until the window ends,
waits in the same bounded queue (same bounds, same overflow policy), and the
stream waits once in its handler's :class:`~sse_handler.coalesce.Coalescer`;
when the window ends, :meth:`FrameWriter.write_coalesced` writes the queue in
one ``send``, and what the kernel does not take is left to the I/O task as on
the fast path. While the queue waits for the window the stream is
*coalescing*: :meth:`FrameWriter.flush` and :meth:`FrameWriter.stop` write it
at once rather than wait, and any wake of the I/O task hands the queue to the
task instead. A plain :class:`FrameWriter` is never coalescing, and its fast
path has no check for it.

The state (:class:`~sse_handler.lifecycle.State`) changes only in
``FrameWriter._enter``, against the table in ``lifecycle``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .coalesce import Coalescer
from .errors import ConnectionClosedError
from .lifecycle import TRANSITIONS, CloseReason, OverflowPolicy, State
from .tasks import cancel, log, spawn

__all__ = [
    "CoalescingWriter",
    "FrameWriter",
    "Framed",
    "Transport",
    "WriteLimits",
    "chunk",
    "chunked_for",
    "framed",
]

# What registration holds behind the head at most before writing it anyway: a
# registered() hook that sends a large snapshot must not wait on the hold.
HOLD_LIMIT = 64 * 1024

#: The end of a chunked body (RFC 9112 section 7.1): sent when a stream ends cleanly.
LAST_CHUNK = b"0\r\n\r\n"

#: A frame in both framings: close-delimited (HTTP/1.0) and chunked (HTTP/1.1).
Framed = tuple[bytes, bytes]

_OPENING, _HELD, _LIVE, _DRAINING, _CLOSED = State


def chunked_for(http_version: str) -> bool:
    """Chunked transfer coding for HTTP/1.1 and later; HTTP/1.0 has none, so its
    body is close-delimited. Chunks matter to clients built on urllib3, which
    read a close-delimited body in 512-byte blocks: an event would wait there
    until 512 more bytes arrive."""
    return http_version != "HTTP/1.0"


def chunk(frame: bytes) -> bytes:
    """``frame`` as one HTTP/1.1 chunk (RFC 9112 section 7.1)."""
    return b"%x\r\n%b\r\n" % (len(frame), frame)


def framed(frame: bytes) -> Framed:
    """Both framings of ``frame``, computed once for a fan-out to many streams."""
    return (frame, chunk(frame))


class Transport(Protocol):
    """The socket of one stream, as the write path needs it."""

    def send(self, data: bytes | memoryview, /) -> int:
        """Write what the socket takes now; return the count (0: it takes
        nothing now). May raise ``BlockingIOError`` (same as 0) or ``OSError``
        (the peer is gone)."""

    #: True when a refused write must be retried with the same bytes first (TLS).
    @property
    def sticky_writes(self) -> bool: ...

    def watch(self, on_gone: Callable[[CloseReason], None]) -> None:
        """Call ``on_gone(reason)`` when the peer closes or resets."""

    def want_writable(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` once the socket takes more; ``None`` stops that.

        A no-op once the transport is closed.
        """

    def gone_reason(self, exc: OSError, otherwise: CloseReason) -> CloseReason:
        """The close reason for an error the socket raised."""

    def close(self) -> None:
        """Close the socket (idempotent); nothing touches its fd afterwards."""


@dataclass(frozen=True, slots=True)
class WriteLimits:
    """The bounds of one stream's write path (the handler's settings)."""

    max_queue_messages: int = 1000
    max_queue_bytes: int = 1 << 20
    overflow_policy: OverflowPolicy = OverflowPolicy.DISCONNECT
    #: Seconds one batch may wait for the reader (0 = forever).
    write_timeout: float = 30.0
    #: Largest encoded event accepted (0 = any).
    max_event_size: int = 0

    def check_event_size(self, frame: bytes) -> None:
        """Refuse (``ValueError``) a frame over :attr:`max_event_size`."""
        limit = self.max_event_size
        if limit and len(frame) > limit:
            raise ValueError(f"event is {len(frame)} bytes encoded; max_event_size is {limit}")


class _Closed(Exception):
    """Internal: the stream closed under the I/O task."""


class _NoQueue(collections.deque[bytes]):
    """The queue of every writer that has nothing queued, shared by all.

    Why: an empty ``deque`` still holds a 64-slot block, about 600 bytes, and
    ``clear()`` allocates a fresh one; that was a seventh of an idle stream's
    memory. A writer takes a deque of its own when something is queued
    (``FrameWriter._own_queue``) and drops it when the queue empties. Adding
    to this one raises, so a path that forgot ``_own_queue`` fails loudly.
    """

    def _refuse(self, *args: object) -> None:
        raise RuntimeError("frame added to the shared empty queue")

    append = appendleft = extend = extendleft = insert = _refuse


_NO_QUEUE = _NoQueue()


class FrameWriter:
    """The write path of one stream (see the module docstring)."""

    __slots__ = (
        "_chunked",
        "_closed_waiter",
        "_coalescing",
        "_dropped_bytes",
        "_extra",
        "_flush_waiters",
        "_inflight",
        "_io_task",
        "_limits",
        "_name",
        "_on_closed",
        "_pinned",
        "_queue",
        "_queued_bytes",
        "_reason",
        "_send",
        "_state",
        "_transport",
        "_wakeup",
        "_writable",
        "bytes_sent",
        "dropped",
        "events_sent",
        "quiet",
    )

    def __init__(
        self,
        transport: Transport,
        limits: WriteLimits,
        *,
        chunked: bool,
        name: str,
        on_closed: Callable[[CloseReason], None],
    ) -> None:
        self._transport = transport
        self._send = transport.send
        self._limits = limits
        self._chunked = 1 if chunked else 0
        self._name = name
        self._on_closed = on_closed
        self._state = _OPENING
        # The reason a DRAINING stream will close with; then the close reason.
        self._reason: CloseReason | None = None
        self._queue: collections.deque[bytes] = _NO_QUEUE
        self._queued_bytes = 0
        self._pinned = False
        # The queue waits for the end of a coalescing window (CoalescingWriter
        # only): nobody has woken the I/O task for it.
        self._coalescing = False
        # Bytes of the batch the I/O task is writing (0: none in flight).
        self._inflight = 0
        # Bytes drop_oldest discarded after they were accepted.
        self._dropped_bytes = 0
        # (bytes_sent that settles it, accepted bytes when it began, future).
        self._flush_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._wakeup: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[bool] | None = None
        self._io_task: asyncio.Future[None] | None = None
        self._closed_waiter: asyncio.Future[None] | None = None
        # More frames for each batch (an overridden poll_data_immediate()).
        self._extra: Callable[[], list[bytes]] | None = None
        #: Events accepted and not dropped: written, or waiting in the queue.
        self.events_sent = 0
        #: Bytes the socket took.
        self.bytes_sent = 0
        #: Frames discarded by the overflow policy.
        self.dropped = 0
        #: Keep-alive ticks since the last write (a counter is cheaper than a clock).
        self.quiet = 0
        transport.watch(self._gone)

    # ---------------------------------------------------------------- state

    @property
    def state(self) -> State:
        return self._state

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the stream ended; ``None`` until it is CLOSED."""
        return self._reason if self._state is _CLOSED else None

    @property
    def ending_reason(self) -> CloseReason | None:
        """The reason of a DRAINING or CLOSED stream."""
        return self._reason

    @property
    def chunked(self) -> bool:
        return bool(self._chunked)

    def _enter(self, state: State) -> None:
        """The one place the state changes; any change the table lacks is a bug."""
        if state not in TRANSITIONS[self._state]:
            raise RuntimeError(f"stream {self._name}: {self._state.name} -> {state.name}")
        self._state = state

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def pinned(self) -> bool:
        """True while the queue's first frame is the rest of a partly written
        (or, over TLS, a refused) write: it goes out whole, never dropped."""
        return self._pinned

    @property
    def coalescing(self) -> bool:
        """True while the queued frames wait for the end of a coalescing window."""
        return self._coalescing

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def pending(self) -> bool:
        """True while anything sent is not yet on the socket."""
        return bool(self._queue or self._inflight)

    def set_extra(self, extra: Callable[[], list[bytes]] | None) -> None:
        """Frames to add to every batch (what an overridden poll_data_immediate gives)."""
        self._extra = extra

    # ---------------------------------------------------------------- sends

    def frame(self, frame: bytes) -> bytes:
        """``frame`` in this stream's framing."""
        return chunk(frame) if self._chunked else frame

    def send(self, frame: bytes) -> bool:
        """One encoded event from the application: size-checked, framed, counted.

        Raises :class:`ConnectionClosedError` once the stream is draining or closed.
        """
        if self._state >= _DRAINING:
            raise ConnectionClosedError(self._name, self._reason)
        self._limits.check_event_size(frame)
        if self._push(chunk(frame) if self._chunked else frame):
            self.events_sent += 1
            return True
        return False

    def deliver(self, frames: Framed) -> bool:
        """One event of a fan-out (size checked once for all): False if this
        stream has ended or dropped it, never an error.

        The hottest code of the library (once per event per client): the
        fast path of ``_push`` is written out here, which saves two calls
        per delivery (measured: 1.55 -> 1.2 us of interpreter time each).
        """
        if self._state is _LIVE and not self._queue and not self._inflight:
            frame = frames[self._chunked]
            try:
                sent = self._send(frame)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.close(self._transport.gone_reason(exc, CloseReason.WRITE_ERROR))
                return False
            self.bytes_sent += sent
            self.quiet = 0
            self.events_sent += 1
            if sent != len(frame):
                self._queue_rest(frame, sent)
            return True
        if self._state < _DRAINING and self._push(frames[self._chunked]):
            self.events_sent += 1
            return True
        return False

    def keepalive(self, frames: Framed, quiet_ticks: int) -> None:
        """One tick of the keep-alive timer: a comment after ``quiet_ticks`` quiet ones."""
        self.quiet += 1
        if self.quiet >= quiet_ticks and self._state is _LIVE and not self.pending:
            self._push(frames[self._chunked])

    async def send_paced(self, *frames: bytes) -> None:
        """``send`` each frame, but first wait for the reader while the queue is
        past half its bounds: a replay larger than the queue goes out at the
        reader's pace (a reader too slow for it meets the write deadline,
        ``slow``). Frames go in batches of up to a quarter of the bounds, each
        batch in one write when nothing waits (:meth:`send_many`)."""
        limits = self._limits
        most_frames = max(1, limits.max_queue_messages // 4)
        most_bytes = max(1, limits.max_queue_bytes // 4)
        start = 0
        while start < len(frames):
            end, size = start + 1, len(frames[start])
            while (
                end < len(frames)
                and end - start < most_frames
                and size + len(frames[end]) <= most_bytes
            ):
                size += len(frames[end])
                end += 1
            while self._state < _DRAINING and (
                self._queued_bytes * 2 > limits.max_queue_bytes
                or len(self._queue) * 2 > limits.max_queue_messages
            ):
                await self.flush()
            self.send_many(frames[start:end])
            start = end

    def send_many(self, frames: Sequence[bytes]) -> None:
        """Encoded events from the application, each size-checked, framed and
        counted as by :meth:`send`, in one write when the stream has nothing
        waiting (one system call for a replay instead of one per event).

        What the socket does not take is queued as one frame taken in part is
        (past the bounds: :meth:`send_paced` keeps batches within them); a
        stream with frames waiting queues them one by one, bounded. Raises
        :class:`ConnectionClosedError` once the stream is draining or closed.
        """
        out = self._checked(frames)
        if self._state is not _LIVE or self._queue or self._inflight or self._coalescing:
            self._push_each(out)
            return
        self._own_queue().extend(out)
        self._queued_bytes += sum(map(len, out))
        self.events_sent += len(out)
        self._write_queued()

    def _checked(self, frames: Sequence[bytes]) -> list[bytes]:
        """``frames`` size-checked and framed, or an error (see :meth:`send_many`)."""
        if self._state >= _DRAINING:
            raise ConnectionClosedError(self._name, self._reason)
        for frame in frames:
            self._limits.check_event_size(frame)
        return [chunk(frame) for frame in frames] if self._chunked else list(frames)

    def _push_each(self, frames: list[bytes]) -> None:
        for frame in frames:
            if self._push(frame):
                self.events_sent += 1

    def _push(self, frame: bytes, bounded: bool = True) -> bool:
        """Write now if nothing waits, else queue; False if the frame was dropped."""
        queue = self._queue
        if not queue and not self._inflight and self._state > _HELD:
            # Fast path: nothing is waiting, so nothing can be overtaken.
            return self._write_now(frame)
        if self._state <= _HELD:
            # Registration: outside the bounds (the application's synchronous
            # hooks decide how much), held back up to HOLD_LIMIT bytes.
            self._own_queue().append(frame)
            self._queued_bytes += len(frame)
            # Not again while the socket holds back a remainder (pinned): the
            # I/O task writes it; joining the growing queue per frame would
            # copy it over and over.
            if (
                self._queued_bytes >= HOLD_LIMIT
                and self._state is _HELD
                and not self._inflight
                and not self._pinned
            ):
                self._write_queue()
            return True
        if bounded and not self._fits(len(frame)):
            return False
        self._own_queue().append(frame)
        self._queued_bytes += len(frame)
        self._wake()
        return True

    def _own_queue(self) -> collections.deque[bytes]:
        """The queue, to add to: this stream's own once it holds anything."""
        if self._queue is _NO_QUEUE:
            self._queue = collections.deque()
        return self._queue

    def _write_now(self, frame: bytes) -> bool:
        """One non-blocking ``send``; what the kernel does not take heads the
        queue for the I/O task. False if the socket failed (now closed)."""
        try:
            sent = self._send(frame)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close(self._transport.gone_reason(exc, CloseReason.WRITE_ERROR))
            return False
        self.bytes_sent += sent
        self.quiet = 0
        if sent != len(frame):
            self._queue_rest(frame, sent)
        return True

    def _queue_rest(self, frame: bytes, sent: int) -> None:
        """The kernel took ``sent`` bytes of ``frame`` (maybe none): the rest
        heads the queue, pinned, for the I/O task."""
        self._pinned = bool(sent) or self._transport.sticky_writes
        self._own_queue().appendleft(frame[sent:] if sent else frame)
        self._queued_bytes += len(frame) - sent
        self._wake()

    def _write_queue(self) -> None:
        """Everything queued in one ``send`` (a held head and what follows it).

        What the socket does not take is pinned even if it took nothing: it
        starts with the response head, which ``drop_oldest`` must never drop.
        """
        held = b"".join(self._queue)
        self._queue = _NO_QUEUE
        self._queued_bytes = 0
        self._write_now(held)
        if self._queue:
            self._pinned = True

    def write_coalesced(self) -> None:
        """End this stream's coalescing window: every queued frame in one ``send``.

        Called by the handler's :class:`~sse_handler.coalesce.Coalescer` when
        the window ends, and by :meth:`flush` and :meth:`stop` before it does.
        A no-op unless the stream is :attr:`coalescing` (it flushed, stopped,
        closed or handed its queue to the I/O task meanwhile).
        """
        if not self._coalescing:
            return
        self._coalescing = False
        if self._state is _CLOSED or not self._queue or self._inflight:
            return  # (in flight: the I/O task takes the queue after its batch)
        self._write_queued()

    def _write_queued(self) -> None:
        """The whole queue in one ``send``; the frames the socket does not take
        stay queued, one by one, for the I/O task (:meth:`_keep_unsent`)."""
        queue = self._queue
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        try:
            sent = self._send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close(self._transport.gone_reason(exc, CloseReason.WRITE_ERROR))
            return
        self.bytes_sent += sent
        self.quiet = 0
        if sent == len(data):
            self._queue = _NO_QUEUE
            self._queued_bytes = 0
        else:
            self._keep_unsent(data, sent)
        if self._flush_waiters:
            self._resolve_flush_waiters()

    def _keep_unsent(self, data: bytes, sent: int) -> None:
        """The kernel took ``sent`` bytes of the queue joined as ``data``: the
        frames it took leave the queue, the rest stays for the I/O task.

        As on the fast path, the rest of a frame taken in part is pinned, and
        so, over TLS, is a refused write -- there the whole of ``data``, which
        OpenSSL must be offered again first.
        """
        queue = self._queue
        self._queued_bytes -= sent
        if not sent and self._transport.sticky_writes:
            if len(queue) > 1:
                queue.clear()
                queue.append(data)
            self._pinned = True
        else:
            while sent >= len(queue[0]):
                sent -= len(queue.popleft())
            if sent:
                queue[0] = queue[0][sent:]
            self._pinned = bool(sent)
        self._wake()

    def _fits(self, size: int) -> bool:
        """Apply the queue bounds and the overflow policy to one more frame."""
        limits = self._limits
        max_messages = limits.max_queue_messages
        max_bytes = limits.max_queue_bytes
        queue = self._queue
        if len(queue) < max_messages and self._queued_bytes + size <= max_bytes:
            return True
        policy = limits.overflow_policy
        if policy is OverflowPolicy.DROP_NEWEST:
            self.dropped += 1
            return False
        if policy is OverflowPolicy.DROP_OLDEST:
            keep = 1 if self._pinned else 0
            while len(queue) > keep and (
                len(queue) >= max_messages or self._queued_bytes + size > max_bytes
            ):
                oldest = queue[keep]
                if self._flush_waiters:
                    self._drop_for_flush_waiters(len(oldest), len(queue[0]) if keep else 0)
                del queue[keep]
                self._queued_bytes -= len(oldest)
                self._dropped_bytes += len(oldest)
                self.dropped += 1
                self.events_sent -= 1
            if self._flush_waiters:
                self._resolve_flush_waiters()
            if len(queue) < max_messages and self._queued_bytes + size <= max_bytes:
                return True
            self.dropped += 1
            return False
        self.dropped += 1 + len(queue)
        self.events_sent -= len(queue)
        self.close(CloseReason.OVERFLOW)
        return False

    # ------------------------------------------------------------- head, hold

    def hold(self, head: bytes) -> None:
        """Queue the response head first and hold it (and what follows) back
        until :meth:`release`, or until HOLD_LIMIT bytes are held: head and
        welcome event leave in one ``send``. Until :meth:`release` frames are
        outside the queue bounds (a snapshot sent from ``registered()``
        arrives whole), written as the socket takes them past the limit."""
        self._enter(_HELD)
        self._own_queue().appendleft(head)
        self._queued_bytes += len(head)

    def release(self) -> None:
        """Write what is held, in one call; what the kernel does not take heads
        the queue like any partly written frame. A no-op once LIVE."""
        if self._state > _HELD:
            return
        self._enter(_LIVE)
        if self._queue and not self._inflight:
            self._write_queue()

    # ----------------------------------------------------------------- flush

    async def flush(self) -> None:
        """Wait until everything sent so far has been handed to the socket.

        Raises :class:`ConnectionClosedError` if the stream closes first.
        """
        if self._state is _HELD:
            self.release()
        # Flushing a coalescing stream ends its window now: waiting for the
        # window would add its latency to every flush (a paced replay flushes often).
        self.write_coalesced()
        if self._state is _CLOSED:
            raise ConnectionClosedError(self._name, self._reason)
        if not self.pending:
            return
        # Wait until what is pending now is written, less what drop_oldest
        # discards of it later (see _drop_for_flush_waiters).
        need = self.bytes_sent + self._queued_bytes + self._inflight
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((need, need + self._dropped_bytes, fut))
        await fut

    def _drop_for_flush_waiters(self, size: int, pinned: int) -> None:
        """drop_oldest is about to discard the first frame behind a pinned head
        (``pinned`` bytes; 0 if none): flushes that began after that frame was
        accepted stop waiting for it. Writes keep the queue's order, so a flush
        is settled once ``bytes_sent`` reaches its ``need``; a frame dropped
        behind a pinned head or a batch in flight may have come after the
        flush, and then it settles nothing for it."""
        accepted = self.bytes_sent + self._inflight + self._queued_bytes + self._dropped_bytes
        # After a pinned head the queue holds the last bytes accepted, in order.
        start = accepted - self._queued_bytes + pinned
        self._flush_waiters = [
            (need - size if start < began else need, began, fut)
            for need, began, fut in self._flush_waiters
        ]

    def _resolve_flush_waiters(self, exc: BaseException | None = None) -> None:
        sent = self.bytes_sent
        keep = []
        for need, began, fut in self._flush_waiters:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            elif need <= sent:
                fut.set_result(None)
            else:
                keep.append((need, began, fut))
        self._flush_waiters = keep

    # ---------------------------------------------------------------- I/O task

    def _wake(self) -> None:
        # The I/O task takes the whole queue, coalesced frames included.
        self._coalescing = False
        if self._state is _OPENING:
            return  # nothing may leave before the head
        if self._io_task is None:
            self._io_task = spawn(self._run(), f"the I/O task of stream {self._name}")
            return
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def next_frame(self) -> bytes:
        """Wait for and take the first queued frame."""
        while not self._queue:
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        frame = self._queue.popleft()
        if not self._queue:
            self._queue = _NO_QUEUE
        self._queued_bytes -= len(frame)
        self._pinned = False
        # Woken for a queue that drop_oldest emptied, the task may find the
        # first frame of a new window: taken here, it is the task's to write.
        self._coalescing = False
        return frame

    def ready_frames(self) -> list[bytes]:
        """Take every queued frame, without waiting."""
        if not self._queue:
            return []
        frames = list(self._queue)
        self._queue = _NO_QUEUE
        self._queued_bytes = 0
        self._pinned = False
        return frames

    async def _run(self) -> None:
        try:
            while True:
                frames = [await self.next_frame(), *self.ready_frames()]
                if self._extra is not None:
                    extra = self._extra()
                    self.events_sent += len(extra)
                    frames += [self.frame(f) for f in extra]
                await self._write(frames[0] if len(frames) == 1 else b"".join(frames))
                if self._state is _DRAINING and not self._queue:
                    self._finish()
                    return
        except _Closed:
            return
        except Exception:
            log.exception("Uncaught exception in the I/O task of stream %s", self._name)
            self.close(CloseReason.HOOK_ERROR)

    async def _write(self, data: bytes) -> None:
        """Write one batch, waiting for writability under the write deadline."""
        view = memoryview(data)
        deadline: float | None = None
        self._inflight = len(view)
        try:
            while view:
                try:
                    sent = self._send(view)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self.close(self._transport.gone_reason(exc, CloseReason.WRITE_ERROR))
                    raise _Closed from None
                if sent:
                    self.bytes_sent += sent
                    self.quiet = 0
                    view = view[sent:]
                    self._inflight = len(view)
                if view:
                    if deadline is None and self._limits.write_timeout:
                        # One deadline for the whole batch: a reader that
                        # trickles a byte at a time is as stuck as a frozen one.
                        loop = asyncio.get_running_loop()
                        deadline = loop.time() + self._limits.write_timeout
                    await self._wait_writable(deadline)
        finally:
            self._inflight = 0
        if self._flush_waiters:
            self._resolve_flush_waiters()

    async def _wait_writable(self, deadline: float | None) -> None:
        """Wait until the socket takes more; past ``deadline`` the reader is too slow."""
        loop = asyncio.get_running_loop()
        fut = self._writable = loop.create_future()
        self._transport.want_writable(self._on_writable)
        timer = None if deadline is None else loop.call_at(deadline, self._on_deadline)
        try:
            writable = await fut
        finally:
            self._writable = None
            if self._state is not _CLOSED:  # a closed transport is not touched again
                self._transport.want_writable(None)
            if timer is not None:
                timer.cancel()
        if not writable:
            self.close(self._reason or CloseReason.SLOW)
            raise _Closed

    def _on_writable(self) -> None:
        fut = self._writable
        if fut is not None and not fut.done():
            fut.set_result(True)

    def _on_deadline(self) -> None:
        fut = self._writable
        if fut is not None and not fut.done():
            fut.set_result(False)

    # ----------------------------------------------------------------- ending

    def stop(self, reason: CloseReason, last: bytes = b"") -> None:
        """Refuse further sends, write what is queued and ``last`` (framed here;
        outside the bounds: it is the last frame), then close with ``reason``.

        A held head is written first. A no-op once draining or closed.
        """
        if self._state >= _DRAINING:
            return
        self.release()
        if self._state is _CLOSED:
            return  # writing the head found the client gone
        self._reason = reason
        self._enter(_DRAINING)
        if last:
            self._push(self.frame(last), bounded=False)
        # A coalescing stream's queue (``last`` now at its end) leaves in one send.
        self.write_coalesced()
        if self._state is _DRAINING and not self.pending:
            self._finish()

    def _finish(self) -> None:
        """A clean end: the last chunk (if the kernel takes it now), then close."""
        if self._chunked:
            try:
                self._send(LAST_CHUNK)
            except OSError:
                pass
        assert self._reason is not None
        self.close(self._reason)

    def _gone(self, reason: CloseReason) -> None:
        # A draining stream keeps its own reason: the client merely left first.
        self.close(self._reason if self._state is _DRAINING and self._reason else reason)

    def close(self, reason: CloseReason) -> None:
        """End the stream now, dropping what is queued; runs its effects once.

        A held head is written first, so the client sees a response.
        """
        if self._state is _CLOSED:
            return
        if self._state is _HELD:
            self.release()
            if self._state is _CLOSED:
                return  # writing it found the client gone: closed for that reason
        self._reason = reason
        self._enter(_CLOSED)
        self._transport.close()
        cancel(self._io_task)
        self._queue = _NO_QUEUE
        self._queued_bytes = 0
        self._pinned = False
        self._coalescing = False
        self._resolve_flush_waiters(ConnectionClosedError(self._name, reason))
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        self._on_closed(reason)

    async def wait_closed(self) -> CloseReason:
        """Wait until the stream is CLOSED; returns the close reason."""
        if self._state is not _CLOSED:
            if self._closed_waiter is None:
                self._closed_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._closed_waiter)
        assert self._reason is not None
        return self._reason

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} {self._state.name.lower()}>"


class CoalescingWriter(FrameWriter):
    """The write path of a stream whose handler has a ``coalesce_window``:
    a live stream's frames wait for the end of the window and leave together
    (see the module docstring).

    Only where a frame goes differs from :class:`FrameWriter`: a frame for a
    LIVE stream with nothing queued and nothing in flight, and any frame while
    the stream is coalescing, is queued for the window; every other frame
    (registration, a queue or a batch that the I/O task has) goes as it would
    there. ``bounded`` frames are held to the queue bounds and overflow policy
    once the queue holds one: the first frame of a window, like a frame on the
    fast path, is always taken.
    """

    __slots__ = ("_coalescer",)

    def __init__(
        self,
        transport: Transport,
        limits: WriteLimits,
        *,
        chunked: bool,
        name: str,
        on_closed: Callable[[CloseReason], None],
        coalescer: Coalescer,
    ) -> None:
        super().__init__(transport, limits, chunked=chunked, name=name, on_closed=on_closed)
        self._coalescer = coalescer

    def send_many(self, frames: Sequence[bytes]) -> None:
        """Each frame waits for the window like any event (one write at its end)."""
        self._push_each(self._checked(frames))

    def deliver(self, frames: Framed) -> bool:
        """One event of a fan-out: queued for the window (see the class docstring)."""
        if self._state < _DRAINING and self._push(frames[self._chunked]):
            self.events_sent += 1
            return True
        return False

    def _push(self, frame: bytes, bounded: bool = True) -> bool:
        queue = self._queue
        if not self._coalescing and (self._state is not _LIVE or queue or self._inflight):
            return super()._push(frame, bounded)
        if bounded and queue and not self._fits(len(frame)):
            return False
        self._own_queue().append(frame)
        self._queued_bytes += len(frame)
        if not self._coalescing:
            self._coalescing = True
            self._coalescer.add(self)
        return True
