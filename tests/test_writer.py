"""FrameWriter over a scripted transport: every branch of the write path, byte by byte.

No sockets and no Tornado: :class:`ScriptedTransport` answers each ``send`` from
a script (take N bytes, take nothing, would block, fail), hands writability and
the peer's close to the test, and records every call it gets. The autouse
fixture fails a test in which anything touched a transport after it was closed
-- with a real socket that fd number may already belong to another connection.

The loop is driven by ``await asyncio.sleep(0)`` turns and futures with
timeouts; the write deadline is the only timer, and it is tiny.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from sse_handler import coalesce
from sse_handler.coalesce import Coalescer
from sse_handler.errors import ConnectionClosedError
from sse_handler.lifecycle import TRANSITIONS, CloseReason, OverflowPolicy, State
from sse_handler.writer import (
    HOLD_LIMIT,
    LAST_CHUNK,
    CoalescingWriter,
    FrameWriter,
    WriteLimits,
    chunk,
    chunked_for,
    framed,
)

# --- the scripted transport ------------------------------------------------------------

#: A step of the script: take this many bytes (at most what was offered).
ALL = -1  # take everything offered
BLOCK = -2  # raise BlockingIOError (the same as taking nothing)
Step = int | OSError

_transports: list[ScriptedTransport] = []


class ScriptedTransport:
    """A :class:`~sse_handler.writer.Transport` whose ``send`` follows a script.

    Each ``send`` takes the next step (``then`` once the script is used up):
    an ``int`` >= 0 takes that many bytes, :data:`ALL` all of them,
    :data:`BLOCK` raises ``BlockingIOError``, an ``OSError`` is raised.
    ``want_writable`` and ``watch`` only store their callbacks: the test fires
    them with :meth:`writable` and :meth:`peer_closes`.
    """

    def __init__(self, *script: Step, then: Step = ALL, sticky: bool = False) -> None:
        self.script: deque[Step] = deque(script)
        self.then = then
        self.sticky_writes = sticky
        #: What each send() was offered, in order.
        self.offered: list[bytes] = []
        #: What the socket took: the bytes the peer receives.
        self.wire = bytearray()
        #: Every call as (method, whether the transport was already closed).
        self.calls: list[tuple[str, bool]] = []
        self.closed = False
        self.closes = 0
        self.on_gone: Callable[[CloseReason], None] | None = None
        self.on_writable: Callable[[], None] | None = None
        _transports.append(self)

    def _called(self, name: str) -> None:
        self.calls.append((name, self.closed))

    # -- the Transport protocol

    def send(self, data: bytes | memoryview, /) -> int:
        self._called("send")
        data = bytes(data)
        self.offered.append(data)
        step = self.script.popleft() if self.script else self.then
        if isinstance(step, OSError):
            raise step
        if step == BLOCK:
            raise BlockingIOError(errno.EAGAIN, "would block")
        taken = len(data) if step == ALL else min(step, len(data))
        self.wire += data[:taken]
        return taken

    def watch(self, on_gone: Callable[[CloseReason], None]) -> None:
        self._called("watch")
        self.on_gone = on_gone

    def want_writable(self, callback: Callable[[], None] | None) -> None:
        self._called("want_writable")
        self.on_writable = callback

    def gone_reason(self, exc: OSError, otherwise: CloseReason) -> CloseReason:
        self._called("gone_reason")
        return CloseReason.DEAD_PEER if exc.errno == errno.ETIMEDOUT else otherwise

    def close(self) -> None:
        self._called("close")
        self.closed = True
        self.closes += 1

    # -- the test's side

    def writable(self, *steps: Step) -> None:
        """The socket takes more: the next sends follow ``steps`` (then ``then``)."""
        self.script.extend(steps)
        assert self.on_writable is not None, "nobody waits for writability"
        self.on_writable()

    def peer_closes(self, reason: CloseReason = CloseReason.CLIENT_CLOSED) -> None:
        assert self.on_gone is not None
        self.on_gone(reason)

    @property
    def used_after_close(self) -> list[str]:
        return [name for name, closed in self.calls if closed]


@pytest.fixture(autouse=True)
def _nothing_touches_a_closed_transport() -> Iterator[None]:
    _transports.clear()
    yield
    for transport in _transports:
        assert transport.used_after_close == [], "the transport was used after close()"
        assert transport.closes <= 1


# --- helpers ---------------------------------------------------------------------------

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
BYE = b"event: bye\ndata: \n\n"
KEEPALIVE = framed(b":\n\n")


def ev(i: int) -> bytes:
    """An 11-byte frame."""
    return b"data: %03d\n\n" % i


def writer(
    transport: ScriptedTransport | None = None,
    *,
    chunked: bool = False,
    live: bool = True,
    cls: type[FrameWriter] = FrameWriter,
    **limits: Any,
) -> tuple[FrameWriter, ScriptedTransport, list[CloseReason]]:
    """A writer over ``transport``, LIVE unless ``live=False``; its close reasons."""
    transport = transport or ScriptedTransport()
    closed: list[CloseReason] = []
    w = cls(transport, WriteLimits(**limits), chunked=chunked, name="s1", on_closed=closed.append)
    if live:
        w.release()
    return w, transport, closed


async def turns(n: int = 5) -> None:
    """Let the loop run ``n`` times (the I/O task takes one turn per step)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def in_flight(
    *frames: bytes, **kwargs: Any
) -> tuple[FrameWriter, ScriptedTransport, list[CloseReason]]:
    """A LIVE writer whose I/O task has ``frames`` (one batch) in flight,
    waiting for writability; later sends queue behind it."""
    t = ScriptedTransport(BLOCK, BLOCK)
    w, t, closed = writer(t, **kwargs)
    for frame in frames:
        assert w.send(frame)
    await turns()
    assert t.on_writable is not None
    assert w.queue_depth == 0 and w.pending
    return w, t, closed


# --- fast path and order -----------------------------------------------------------------


async def test_fast_path_writes_each_frame_straight_through() -> None:
    w, t, _ = writer()
    for i in range(3):
        assert w.send(ev(i))
        assert not w.pending
    assert t.offered == [ev(0), ev(1), ev(2)]
    await turns()
    # No I/O task was needed: nobody asked for writability.
    assert [name for name, _ in t.calls] == ["watch", "send", "send", "send"]
    assert w.events_sent == 3
    assert w.bytes_sent == 33


async def test_order_is_kept_across_fast_and_slow_paths() -> None:
    w, t, _ = writer(ScriptedTransport(ALL, BLOCK))
    w.send(ev(0))  # taken at once
    w.send(ev(1))  # would block: heads the queue
    w.send(ev(2))  # queued behind it, not offered to the socket
    w.send(ev(3))
    assert t.offered == [ev(0), ev(1)]
    assert w.queue_depth == 3
    await turns()
    assert t.offered[2] == ev(1) + ev(2) + ev(3)
    assert not w.pending
    w.send(ev(4))  # the queue is empty again: fast path
    assert t.offered[3] == ev(4)
    assert bytes(t.wire) == b"".join(ev(i) for i in range(5))


# --- partial and refused writes --------------------------------------------------------


async def test_partial_write_pins_the_rest_which_goes_out_whole() -> None:
    w, t, _ = writer(ScriptedTransport(3))
    assert w.send(ev(0))
    assert w.pinned
    assert w.queue_depth == 1
    assert w.queued_bytes == len(ev(0)) - 3
    assert w.bytes_sent == 3
    w.send(ev(1))
    await turns()
    assert t.offered == [ev(0), ev(0)[3:] + ev(1)]
    assert bytes(t.wire) == ev(0) + ev(1)
    assert not w.pinned and not w.pending


@pytest.mark.parametrize("sticky", [False, True], ids=["tcp", "tls"])
async def test_a_refused_write_is_pinned_only_over_sticky_writes(sticky: bool) -> None:
    w, _, _ = writer(ScriptedTransport(0, then=BLOCK, sticky=sticky))
    assert w.send(ev(0))
    assert w.queue_depth == 1
    assert w.pinned is sticky


async def test_over_tls_a_refused_write_is_retried_with_the_same_bytes_first() -> None:
    w, t, _ = writer(ScriptedTransport(0, 0, sticky=True))
    w.send(ev(0))  # refused: OpenSSL must see these bytes again first
    w.send(ev(1))
    await turns()
    batch = t.offered[1]
    assert batch == ev(0) + ev(1)
    w.send(ev(2))  # behind the batch in flight, not added to it
    t.writable()
    await turns()
    assert t.offered[2] == batch
    assert t.offered[3] == ev(2)
    assert bytes(t.wire) == ev(0) + ev(1) + ev(2)


async def test_would_block_then_writable_batches_everything_queued_into_one_send() -> None:
    t = ScriptedTransport(BLOCK, BLOCK)
    w, t, _ = writer(t)
    for i in range(3):
        w.send(ev(i))
    assert t.offered == [ev(0)]
    await turns()
    # The I/O task took all three as one batch; the socket would block.
    assert t.offered[1] == ev(0) + ev(1) + ev(2)
    assert t.on_writable is not None
    w.send(ev(3))
    w.send(ev(4))
    assert w.queue_depth == 2
    t.writable()
    await turns()
    assert t.offered[2:] == [ev(0) + ev(1) + ev(2), ev(3) + ev(4)]
    assert t.on_writable is None  # no writability wanted while idle
    assert not w.pending
    assert w.bytes_sent == len(t.wire) == 55


async def test_a_batch_taken_a_byte_at_a_time_goes_out_in_order() -> None:
    w, t, _ = writer(ScriptedTransport(BLOCK, 1, 1))
    w.send(ev(0))
    w.send(ev(1))
    batch = ev(0) + ev(1)
    await turns()
    assert t.offered[1:] == [batch]
    t.writable()
    await turns()
    assert t.offered[1:] == [batch, batch[1:]]
    t.writable()
    await turns()
    assert t.offered[1:] == [batch, batch[1:], batch[2:]]
    assert bytes(t.wire) == batch
    assert w.bytes_sent == 22 and not w.pending


# --- the peer is gone --------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [BrokenPipeError(errno.EPIPE, "broken pipe"), ConnectionResetError(errno.ECONNRESET, "reset")],
    ids=["EPIPE", "ECONNRESET"],
)
async def test_a_write_error_in_the_io_task_closes_once(error: OSError) -> None:
    w, t, closed = writer(ScriptedTransport(BLOCK, error))
    w.send(ev(0))
    w.send(ev(1))
    flushes = [asyncio.ensure_future(w.flush()) for _ in range(2)]
    await turns()
    assert closed == [CloseReason.WRITE_ERROR]
    assert w.state is State.CLOSED
    assert w.close_reason is CloseReason.WRITE_ERROR
    assert t.closes == 1
    for flush in flushes:
        with pytest.raises(ConnectionClosedError) as raised:
            await asyncio.wait_for(flush, 1)
        assert raised.value.reason == CloseReason.WRITE_ERROR
    assert w.queue_depth == 0 and not w.pending
    with pytest.raises(ConnectionClosedError):
        w.send(ev(2))
    w.close(CloseReason.STOPPED)
    await turns()
    assert closed == [CloseReason.WRITE_ERROR]


@pytest.mark.parametrize("where", ["fast path", "I/O task"])
async def test_etimedout_maps_through_gone_reason(where: str) -> None:
    timeout = OSError(errno.ETIMEDOUT, "connection timed out")
    script: tuple[Step, ...] = (timeout,) if where == "fast path" else (BLOCK, timeout)
    w, t, closed = writer(ScriptedTransport(*script))
    accepted = w.send(ev(0))
    await turns()
    assert closed == [CloseReason.DEAD_PEER]
    assert ("gone_reason", False) in t.calls
    # A frame the socket refused with an error was not sent.
    assert accepted is (where == "I/O task")
    assert w.events_sent == (1 if accepted else 0)


@pytest.mark.parametrize(
    ("state", "reason"),
    [("live", CloseReason.CLIENT_CLOSED), ("draining", CloseReason.SHUTDOWN)],
)
async def test_a_peer_that_closes_while_draining_keeps_the_stops_reason(
    state: str, reason: CloseReason
) -> None:
    w, t, closed = await in_flight(ev(0))
    flushing = asyncio.ensure_future(w.flush())
    if state == "draining":
        w.stop(CloseReason.SHUTDOWN, BYE)
    t.peer_closes(CloseReason.CLIENT_CLOSED)
    assert closed == [reason]
    assert w.close_reason is reason
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(flushing, 1)
    await turns()
    assert t.closes == 1


# --- overflow ----------------------------------------------------------------------------


async def test_overflow_disconnect_closes_with_reason_overflow() -> None:
    w, t, closed = await in_flight(ev(0), max_queue_messages=3)
    for i in range(1, 4):
        assert w.send(ev(i))
    assert w.queue_depth == 3 and w.state is State.LIVE
    assert not w.send(ev(4))
    assert closed == [CloseReason.OVERFLOW]
    assert w.close_reason is CloseReason.OVERFLOW
    assert w.dropped == 4  # the one refused and the three queued
    assert w.events_sent == 1  # the one in flight
    await turns()
    assert t.closes == 1
    assert bytes(t.wire) == b""


async def test_overflow_drop_newest_discards_the_new_frame() -> None:
    w, t, closed = await in_flight(
        ev(0), max_queue_messages=2, overflow_policy=OverflowPolicy.DROP_NEWEST
    )
    assert w.send(ev(1)) and w.send(ev(2))
    assert not w.send(ev(3))
    assert not w.deliver(framed(ev(4)))
    assert (w.dropped, w.events_sent, w.queue_depth) == (2, 3, 2)
    t.writable()
    await turns()
    assert bytes(t.wire) == ev(0) + ev(1) + ev(2)
    assert closed == [] and w.state is State.LIVE


async def test_overflow_drop_oldest_never_drops_a_pinned_head() -> None:
    w, t, closed = writer(
        ScriptedTransport(2), max_queue_messages=3, overflow_policy=OverflowPolicy.DROP_OLDEST
    )
    w.send(ev(0))  # the kernel takes 2 bytes: the rest is pinned
    w.send(ev(1))
    w.send(ev(2))
    assert w.pinned and w.queue_depth == 3
    assert w.send(ev(3))  # drops ev(1), not the rest of ev(0)
    assert w.send(ev(4))  # drops ev(2)
    assert w.pinned and w.queue_depth == 3
    assert (w.dropped, w.events_sent) == (2, 3)
    await turns()
    assert t.offered[1] == ev(0)[2:] + ev(3) + ev(4)
    assert bytes(t.wire) == ev(0) + ev(3) + ev(4)
    assert closed == []


async def test_overflow_drop_oldest_by_bytes() -> None:
    w, t, _ = await in_flight(
        ev(0), max_queue_bytes=33, overflow_policy=OverflowPolicy.DROP_OLDEST
    )
    for i in range(1, 4):
        w.send(ev(i))
    assert w.queued_bytes == 33
    big = b"data: " + b"x" * 14 + b"\n\n"  # 22 bytes: two frames must go
    assert w.send(big)
    assert (w.queue_depth, w.queued_bytes, w.dropped) == (2, 33, 2)
    # A frame over the bound never fits: everything queued goes, and so does it.
    assert not w.send(b"x" * 34)
    assert (w.queue_depth, w.queued_bytes, w.dropped) == (0, 0, 5)
    t.writable()
    await turns()
    assert bytes(t.wire) == ev(0)


@pytest.mark.parametrize(
    ("limits", "fit"),
    [
        ({"max_queue_bytes": 33}, 3),
        ({"max_queue_bytes": 32}, 2),
        ({"max_queue_messages": 3}, 3),
        ({"max_queue_messages": 1}, 1),
    ],
)
async def test_queue_bounds(limits: dict[str, Any], fit: int) -> None:
    w, _, _ = await in_flight(ev(0), overflow_policy=OverflowPolicy.DROP_NEWEST, **limits)
    accepted = [w.send(ev(i)) for i in range(1, 6)]
    assert accepted == [True] * fit + [False] * (5 - fit)
    assert w.queue_depth == fit
    assert w.dropped == 5 - fit


async def test_a_refused_head_is_pinned_and_never_dropped() -> None:
    w, t, _ = writer(
        ScriptedTransport(0),
        live=False,
        max_queue_messages=2,
        overflow_policy=OverflowPolicy.DROP_OLDEST,
    )
    w.hold(HEAD)
    w.send(ev(0))
    w.release()  # the socket takes nothing of head + welcome
    assert w.queue_depth == 1
    assert w.pinned
    for i in range(1, 5):
        w.send(ev(i))
    await turns()
    assert bytes(t.wire) == HEAD + ev(0) + ev(4)


# --- flush -------------------------------------------------------------------------------


async def test_flush_waits_until_the_socket_took_everything() -> None:
    w, t, _ = await in_flight(ev(0))
    w.send(ev(1))
    flushing = asyncio.ensure_future(w.flush())
    await turns()
    assert not flushing.done()
    t.writable(ALL, BLOCK)  # ev(0) goes, ev(1) would block
    await turns()
    assert bytes(t.wire) == ev(0)
    assert not flushing.done()
    w.send(ev(2))  # after the flush: not waited for
    t.writable(ALL, BLOCK)
    await asyncio.wait_for(flushing, 1)
    assert bytes(t.wire) == ev(0) + ev(1)
    assert w.pending


async def test_flush_with_nothing_pending_returns_at_once() -> None:
    w, _, _ = writer()
    w.send(ev(0))
    await asyncio.wait_for(w.flush(), 1)


async def test_flush_counts_the_dropped_frames_it_waited_for_but_not_later_ones() -> None:
    w, t, _ = await in_flight(
        ev(0), max_queue_messages=1, overflow_policy=OverflowPolicy.DROP_OLDEST
    )
    w.send(ev(1))
    flushing = asyncio.ensure_future(w.flush())  # waits for ev(0) and ev(1)
    await turns()
    w.send(ev(2))  # drops ev(1): one less to wait for
    w.send(ev(3))  # drops ev(2), sent after the flush: no help
    await turns()
    assert not flushing.done()  # ev(0) is still in flight
    t.writable(ALL, BLOCK)
    await asyncio.wait_for(flushing, 1)
    assert bytes(t.wire) == ev(0)
    assert w.pending  # ev(3) came after the flush


async def test_flush_on_a_closed_stream_raises() -> None:
    w, _, _ = writer()
    w.close(CloseReason.STOPPED)
    with pytest.raises(ConnectionClosedError) as raised:
        await w.flush()
    assert raised.value.reason == CloseReason.STOPPED


# --- the write deadline ------------------------------------------------------------------


async def test_write_deadline_closes_a_reader_that_never_takes_more() -> None:
    w, t, closed = writer(ScriptedTransport(then=BLOCK), write_timeout=0.05)
    w.send(ev(0))
    flushing = asyncio.ensure_future(w.flush())
    assert await asyncio.wait_for(w.wait_closed(), 2) is CloseReason.SLOW
    assert closed == [CloseReason.SLOW]
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(flushing, 1)
    assert t.closes == 1
    assert t.on_writable is None


async def test_a_drain_the_reader_never_takes_ends_at_the_deadline_with_the_stops_reason() -> None:
    w, _, closed = writer(ScriptedTransport(then=BLOCK), write_timeout=0.05)
    w.send(ev(0))
    w.stop(CloseReason.SHUTDOWN, BYE)
    assert await asyncio.wait_for(w.wait_closed(), 2) is CloseReason.SHUTDOWN
    assert closed == [CloseReason.SHUTDOWN]


# --- hold and release of the response head -----------------------------------------------


async def test_flush_releases_a_held_head_with_its_frames_in_one_send() -> None:
    w, t, _ = writer(live=False)
    w.hold(HEAD)
    held = w.state
    assert held is State.HELD
    w.send(ev(0))
    w.deliver(framed(ev(1)))
    assert t.offered == []
    await turns()
    assert t.offered == []
    await asyncio.wait_for(w.flush(), 1)
    assert t.offered == [HEAD + ev(0) + ev(1)]
    assert w.state is State.LIVE
    assert w.events_sent == 2
    w.release()  # a no-op once LIVE
    assert w.state is State.LIVE


async def test_frames_from_before_the_hold_go_after_the_head() -> None:
    w, t, _ = writer(live=False)
    w.deliver(framed(ev(0)))
    assert w.state is State.OPENING
    assert t.offered == []
    w.hold(HEAD)
    w.release()
    assert t.offered == [HEAD + ev(0)]


async def test_hold_limit_writes_the_head_early() -> None:
    w, t, _ = writer(live=False)
    w.hold(HEAD)
    half = b"x" * (HOLD_LIMIT // 2)
    w.send(half)
    assert t.offered == []
    w.send(half)  # past HOLD_LIMIT: written now, still HELD
    assert t.offered == [HEAD + half + half]
    assert w.state is State.HELD
    w.send(ev(0))  # held again until release
    assert len(t.offered) == 1
    w.release()
    assert t.offered[1:] == [ev(0)]


async def test_frames_held_are_outside_the_bounds() -> None:
    w, t, closed = writer(live=False, max_queue_messages=2, max_queue_bytes=40)
    w.hold(HEAD)
    assert all(w.send(ev(i)) for i in range(10))
    assert (w.queue_depth, w.dropped, w.events_sent) == (11, 0, 10)
    assert closed == []
    w.release()
    assert t.offered == [HEAD + b"".join(ev(i) for i in range(10))]
    # Once LIVE the bounds apply again.
    assert w.state is State.LIVE


# --- stop --------------------------------------------------------------------------------


async def test_stop_while_a_batch_is_in_flight_drains_then_closes() -> None:
    w, t, closed = await in_flight(ev(0), chunked=True)
    w.send(ev(1))
    w.stop(CloseReason.STOPPED, BYE)
    assert w.state is State.DRAINING
    assert w.ending_reason is CloseReason.STOPPED
    assert w.close_reason is None
    with pytest.raises(ConnectionClosedError):
        w.send(ev(2))
    assert not w.deliver(framed(ev(3)))
    w.keepalive(KEEPALIVE, 1)
    w.stop(CloseReason.SHUTDOWN)  # a no-op once draining
    assert w.ending_reason is CloseReason.STOPPED
    t.writable()
    assert await asyncio.wait_for(w.wait_closed(), 1) is CloseReason.STOPPED
    c0, c1, bye = chunk(ev(0)), chunk(ev(1)), chunk(BYE)
    assert t.offered == [c0, c0, c0, c1 + bye, LAST_CHUNK]
    assert bytes(t.wire) == c0 + c1 + bye + LAST_CHUNK
    assert closed == [CloseReason.STOPPED]
    assert w.events_sent == 2


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
@pytest.mark.parametrize("last", [b"", BYE], ids=["no farewell", "farewell"])
async def test_stop_with_nothing_pending_closes_at_once(chunked: bool, last: bytes) -> None:
    w, t, closed = writer(chunked=chunked)
    w.stop(CloseReason.STOPPED, last)
    assert w.state is State.CLOSED
    assert closed == [CloseReason.STOPPED]
    expected = [w.frame(last)] if last else []
    assert t.offered == expected + ([LAST_CHUNK] if chunked else [])
    assert t.closes == 1


async def test_stop_writes_a_held_head_first() -> None:
    w, t, closed = writer(live=False, chunked=True)
    w.hold(HEAD)
    w.send(ev(0))
    w.stop(CloseReason.SHUTDOWN, BYE)
    assert t.offered == [HEAD + chunk(ev(0)), chunk(BYE), LAST_CHUNK]
    assert closed == [CloseReason.SHUTDOWN]


async def test_close_writes_a_held_head_first() -> None:
    w, t, closed = writer(live=False)
    w.hold(HEAD)
    w.close(CloseReason.HOOK_ERROR)
    assert t.offered == [HEAD]
    assert closed == [CloseReason.HOOK_ERROR]


# --- the state table ---------------------------------------------------------------------


class TracedWriter(FrameWriter):
    """Records every assignment to the state, wherever the writer makes it."""

    __slots__ = ("changes",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.changes: list[tuple[State | None, State]] = []
        super().__init__(*args, **kwargs)

    @property
    def _state(self) -> State:
        return _STATE_SLOT.__get__(self)  # type: ignore[no-any-return]

    @_state.setter
    def _state(self, state: State) -> None:
        try:
            old = _STATE_SLOT.__get__(self)
        except AttributeError:
            old = None
        self.changes.append((old, state))
        _STATE_SLOT.__set__(self, state)


_STATE_SLOT: Any = FrameWriter.__dict__["_state"]

OPENING, HELD, LIVE, DRAINING, CLOSED = State


async def _hold_release_stop(w: FrameWriter, t: ScriptedTransport) -> None:
    w.hold(HEAD)
    w.release()
    w.stop(CloseReason.STOPPED)


async def _opening_close(w: FrameWriter, t: ScriptedTransport) -> None:
    w.close(CloseReason.CLIENT_CLOSED)


async def _opening_stop(w: FrameWriter, t: ScriptedTransport) -> None:
    w.stop(CloseReason.STOPPED, BYE)


async def _held_close(w: FrameWriter, t: ScriptedTransport) -> None:
    w.hold(HEAD)
    w.close(CloseReason.HOOK_ERROR)


async def _held_head_write_fails(w: FrameWriter, t: ScriptedTransport) -> None:
    t.script.append(BrokenPipeError(errno.EPIPE, "broken pipe"))
    w.hold(HEAD)
    w.stop(CloseReason.STOPPED)


async def _drain_in_flight(w: FrameWriter, t: ScriptedTransport) -> None:
    t.script.extend([BLOCK, BLOCK])
    w.release()
    w.send(ev(0))
    await turns()
    w.stop(CloseReason.STOPPED)
    t.writable()
    await w.wait_closed()


async def _peer_gone_while_draining(w: FrameWriter, t: ScriptedTransport) -> None:
    t.script.extend([BLOCK, BLOCK])
    w.release()
    w.send(ev(0))
    await turns()
    w.stop(CloseReason.STOPPED)
    t.peer_closes()


async def _overflow(w: FrameWriter, t: ScriptedTransport) -> None:
    t.then = BLOCK
    w.release()
    while w.state is State.LIVE:
        w.send(ev(0))


@pytest.mark.parametrize(
    ("scenario", "path"),
    [
        (_hold_release_stop, [OPENING, HELD, LIVE, DRAINING, CLOSED]),
        (_opening_close, [OPENING, CLOSED]),
        (_opening_stop, [OPENING, LIVE, DRAINING, CLOSED]),
        (_held_close, [OPENING, HELD, LIVE, CLOSED]),
        (_held_head_write_fails, [OPENING, HELD, LIVE, CLOSED]),
        (_drain_in_flight, [OPENING, LIVE, DRAINING, CLOSED]),
        (_peer_gone_while_draining, [OPENING, LIVE, DRAINING, CLOSED]),
        (_overflow, [OPENING, LIVE, CLOSED]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
async def test_every_transition_the_writer_makes_is_in_the_table(
    scenario: Callable[[FrameWriter, ScriptedTransport], Awaitable[None]], path: list[State]
) -> None:
    w, t, closed = writer(live=False, cls=TracedWriter, max_queue_messages=10)
    await scenario(w, t)
    await turns()
    assert isinstance(w, TracedWriter)
    changes = w.changes
    assert changes[0] == (None, OPENING)
    for old, new in changes[1:]:
        assert old is not None
        assert new in TRANSITIONS[old], f"{old.name} -> {new.name}"
    assert [new for _, new in changes] == path
    assert len(closed) == 1


@pytest.mark.parametrize(
    "before",
    [
        lambda w: w.hold(HEAD),  # hold() twice
        lambda w: w.release(),  # hold() once LIVE
        lambda w: w.close(CloseReason.STOPPED),  # hold() once CLOSED
    ],
    ids=["held", "live", "closed"],
)
async def test_an_illegal_transition_raises(before: Callable[[FrameWriter], None]) -> None:
    w, t, _ = writer(live=False)
    before(w)
    state = w.state
    offered = list(t.offered)
    with pytest.raises(RuntimeError, match=f"{state.name} -> HELD"):
        w.hold(HEAD)
    assert w.state is state
    assert t.offered == offered


# --- nothing touches a closed transport ----------------------------------------------------


async def test_after_close_nothing_touches_the_transport() -> None:
    w, t, closed = await in_flight(ev(0))
    w.send(ev(1))
    late_writable, late_gone = t.on_writable, t.on_gone
    assert late_writable is not None and late_gone is not None
    flushing = asyncio.ensure_future(w.flush())
    await turns()
    w.close(CloseReason.CLIENT_CLOSED)
    calls = len(t.calls)
    # A socket event that was already on its way, and a peer close after ours.
    late_writable()
    late_gone(CloseReason.CLIENT_CLOSED)
    w.keepalive(KEEPALIVE, 1)
    assert not w.deliver(framed(ev(2)))
    with pytest.raises(ConnectionClosedError):
        w.send(ev(3))
    w.stop(CloseReason.STOPPED, BYE)
    w.close(CloseReason.SLOW)
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(flushing, 1)
    with pytest.raises(ConnectionClosedError):
        await w.flush()
    await turns()  # the cancelled I/O task unwinds
    assert t.calls[calls:] == []
    assert t.closes == 1
    assert closed == [CloseReason.CLIENT_CLOSED]
    assert w.close_reason is CloseReason.CLIENT_CLOSED
    assert await asyncio.wait_for(w.wait_closed(), 1) is CloseReason.CLIENT_CLOSED


async def test_close_while_idle_cancels_the_io_task_quietly() -> None:
    w, t, closed = writer(ScriptedTransport(BLOCK))
    w.send(ev(0))
    await turns()  # the batch went out; the I/O task waits for the next frame
    assert not w.pending
    w.close(CloseReason.STOPPED)
    await turns()
    assert closed == [CloseReason.STOPPED]
    assert t.closes == 1


# --- framing -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
async def test_framing_follows_the_stream(chunked: bool) -> None:
    w, t, _ = writer(chunked=chunked)
    assert w.chunked is chunked
    w.deliver(framed(ev(0)))  # a fan-out frame: both framings computed once
    w.send(ev(1))  # an application frame: framed here
    if chunked:
        assert t.offered == [chunk(ev(0)), chunk(ev(1))]
    else:
        assert t.offered == [ev(0), ev(1)]


def test_framing_helpers() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert framed(b"hi") == (b"hi", b"2\r\nhi\r\n")
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert chunked_for("HTTP/1.1") is True
    assert chunked_for("HTTP/1.0") is False


async def test_send_refuses_an_event_over_max_event_size() -> None:
    w, t, _ = writer(max_event_size=11)
    assert w.send(ev(0))
    with pytest.raises(ValueError, match="max_event_size"):
        w.send(ev(0) + b"x")
    assert t.offered == [ev(0)]
    assert w.events_sent == 1


# --- keep-alive, counters, pacing, extra frames --------------------------------------------


async def test_keepalive_after_quiet_ticks() -> None:
    w, t, _ = writer()
    w.keepalive(KEEPALIVE, 2)
    assert t.offered == []
    w.keepalive(KEEPALIVE, 2)
    assert t.offered == [KEEPALIVE[0]]
    w.keepalive(KEEPALIVE, 2)
    w.send(ev(0))  # a write restarts the count
    w.keepalive(KEEPALIVE, 2)
    assert t.offered == [KEEPALIVE[0], ev(0)]
    w.keepalive(KEEPALIVE, 2)
    assert t.offered[-1] == KEEPALIVE[0]
    assert w.events_sent == 1  # keep-alives are no events


async def test_keepalive_only_when_idle_and_live() -> None:
    w, t, _ = writer(live=False)
    w.keepalive(KEEPALIVE, 1)  # OPENING
    w.hold(HEAD)
    w.keepalive(KEEPALIVE, 1)  # HELD
    assert t.offered == []
    t.script.extend([ALL, BLOCK, BLOCK])
    w.release()
    w.send(ev(0))  # would block: pending
    await turns()
    w.keepalive(KEEPALIVE, 1)
    assert w.queue_depth == 0 and t.offered == [HEAD, ev(0), ev(0)]
    w.stop(CloseReason.STOPPED)
    w.keepalive(KEEPALIVE, 1)  # DRAINING
    t.writable()
    await w.wait_closed()
    w.keepalive(KEEPALIVE, 1)  # CLOSED
    assert KEEPALIVE[0] not in t.offered


async def test_counters() -> None:
    w, t, _ = writer(
        ScriptedTransport(ALL, 5, BLOCK),
        max_queue_messages=2,
        overflow_policy=OverflowPolicy.DROP_NEWEST,
    )
    assert w.send(ev(0))  # taken whole
    assert w.send(ev(1))  # 5 bytes taken, the rest pinned
    assert (w.events_sent, w.bytes_sent, w.dropped) == (2, 16, 0)
    assert w.send(ev(2))
    assert not w.send(ev(3))  # the queue holds two: dropped
    assert (w.events_sent, w.bytes_sent, w.dropped) == (3, 16, 1)
    await turns()
    t.writable()
    await turns()
    assert (w.events_sent, w.bytes_sent, w.dropped) == (3, 33, 1)
    assert w.bytes_sent == len(t.wire)


@pytest.mark.parametrize(
    "limits",
    [{"max_queue_messages": 4}, {"max_queue_bytes": 40}],
    ids=["messages", "bytes"],
)
async def test_send_paced_waits_while_the_queue_is_past_half_its_bounds(
    limits: dict[str, Any],
) -> None:
    w, t, _ = await in_flight(ev(0), **limits)
    w.send(ev(1))
    w.send(ev(2))
    if "max_queue_messages" in limits:
        # Two of four is not past half; a third is.
        await asyncio.wait_for(w.send_paced(ev(3)), 1)
        assert w.queue_depth == 3
    else:
        assert w.queued_bytes * 2 > 40
    paced = asyncio.ensure_future(w.send_paced(ev(9)))
    await turns()
    assert not paced.done()
    t.writable()
    await asyncio.wait_for(paced, 1)
    assert t.wire.endswith(ev(9))
    assert not w.pending


async def test_send_paced_refuses_once_draining() -> None:
    w, _, _ = await in_flight(ev(0))
    w.stop(CloseReason.STOPPED)
    with pytest.raises(ConnectionClosedError):
        await w.send_paced(ev(1))


async def test_send_paced_raises_if_the_stream_closes_while_it_waits() -> None:
    w, _, _ = await in_flight(ev(0), max_queue_messages=2)
    w.send(ev(1))
    w.send(ev(2))
    paced = asyncio.ensure_future(w.send_paced(ev(3)))
    await turns()
    w.close(CloseReason.CLIENT_CLOSED)
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(paced, 1)


async def test_extra_frames_join_each_batch() -> None:
    w, t, _ = writer(ScriptedTransport(BLOCK), chunked=True)
    extra = [[ev(8), ev(9)], []]
    w.set_extra(lambda: extra.pop(0) if extra else [])
    w.send(ev(0))
    await turns()
    assert t.offered[1] == chunk(ev(0)) + chunk(ev(8)) + chunk(ev(9))
    assert w.events_sent == 3


# --- the coalescing window -------------------------------------------------------------
#
# The window is the test's: a Coalescer of a minute that the test ends with
# end_window(), except in the one test that lets its timer fire.


def coalescing(
    transport: ScriptedTransport | None = None,
    *,
    coalescer: Coalescer | None = None,
    chunked: bool = False,
    live: bool = True,
    **limits: Any,
) -> tuple[CoalescingWriter, ScriptedTransport, list[CloseReason], Coalescer]:
    """A CoalescingWriter over ``transport`` (LIVE unless ``live=False``)."""
    transport = transport or ScriptedTransport()
    coalescer = Coalescer(60.0) if coalescer is None else coalescer
    closed: list[CloseReason] = []
    w = CoalescingWriter(
        transport,
        WriteLimits(**limits),
        chunked=chunked,
        name="s1",
        on_closed=closed.append,
        coalescer=coalescer,
    )
    if live:
        w.release()
    return w, transport, closed, coalescer


async def test_without_a_window_a_delivery_is_written_at_once() -> None:
    w, t, _ = writer()
    assert w.deliver(framed(ev(0)))
    # Written before deliver() returned: no window, no task, no timer.
    assert t.offered == [ev(0)]
    assert not w.coalescing and not w.pending
    assert w.deliver(framed(ev(1)))
    assert t.offered == [ev(0), ev(1)]
    assert [name for name, _ in t.calls] == ["watch", "send", "send"]


async def test_events_within_the_window_leave_in_one_send() -> None:
    w, t, closed, coalescer = coalescing()
    for i in range(5):
        assert w.deliver(framed(ev(i)))
    assert w.send(ev(5))
    assert t.offered == []
    assert w.coalescing and w.pending
    assert (w.queue_depth, w.queued_bytes, w.events_sent) == (6, 66, 6)
    assert coalescer.waiting == 1 and coalescer.armed
    coalescer.end_window()
    assert t.offered == [b"".join(ev(i) for i in range(6))]
    assert (w.queue_depth, w.queued_bytes, w.bytes_sent, w.events_sent) == (0, 0, 66, 6)
    assert not w.coalescing and not w.pending
    assert not coalescer.armed and coalescer.waiting == 0
    # The next event opens the next window.
    w.deliver(framed(ev(6)))
    assert coalescer.armed and t.offered[1:] == []
    coalescer.end_window()
    assert t.offered[1:] == [ev(6)]
    await turns()
    # No I/O task was needed: nobody asked for writability.
    assert "want_writable" not in [name for name, _ in t.calls]
    assert closed == []


async def test_chunked_frames_are_coalesced_in_their_chunks() -> None:
    w, t, _, coalescer = coalescing(chunked=True)
    w.deliver(framed(ev(0)))
    w.send(ev(1))
    coalescer.end_window()
    assert t.offered == [chunk(ev(0)) + chunk(ev(1))]


class CountingLoop:
    """Stands for the running loop in ``sse_handler.coalesce``: counts its timers.

    (A proxy rather than a patched loop: uvloop's loop takes no new attributes.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers: list[asyncio.TimerHandle] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        self.timers.append(self.loop.call_later(delay, callback))
        return self.timers[-1]


async def test_one_timer_for_all_the_streams_of_a_window(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = CountingLoop(asyncio.get_running_loop())
    monkeypatch.setattr(coalesce, "asyncio", SimpleNamespace(get_running_loop=lambda: loop))
    coalescer = Coalescer(60.0)
    streams = [coalescing(coalescer=coalescer) for _ in range(100)]
    for w, _, _, _ in streams:
        for i in range(3):
            w.deliver(framed(ev(i)))
    assert len(loop.timers) == 1 and coalescer.waiting == 100
    coalescer.end_window()
    assert loop.timers[0].cancelled()
    for _, t, _, _ in streams:
        assert t.offered == [ev(0) + ev(1) + ev(2)]
    # The next window is the next timer.
    streams[0][0].deliver(framed(ev(3)))
    assert len(loop.timers) == 2


class Signalling(ScriptedTransport):
    """Resolves :attr:`first_send` with the loop's time of the first ``send``."""

    def __init__(self) -> None:
        super().__init__()
        self.first_send: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def send(self, data: bytes | memoryview, /) -> int:
        if not self.first_send.done():
            self.first_send.set_result(asyncio.get_running_loop().time())
        return super().send(data)


async def test_the_timer_ends_the_window_after_the_window() -> None:
    w, t, _, coalescer = coalescing(Signalling(), coalescer=Coalescer(0.02))
    assert isinstance(t, Signalling)
    started = asyncio.get_running_loop().time()
    w.deliver(framed(ev(0)))
    w.deliver(framed(ev(1)))
    assert t.offered == []
    at = await asyncio.wait_for(t.first_send, 2)
    assert at - started >= 0.019
    assert t.offered == [ev(0) + ev(1)]
    assert not coalescer.armed and not w.pending


async def test_a_partly_taken_batch_leaves_the_rest_to_the_io_task_in_order() -> None:
    w, t, _, coalescer = coalescing(ScriptedTransport(15, BLOCK))
    for i in range(3):
        w.deliver(framed(ev(i)))
    coalescer.end_window()
    # ev(0) and 4 bytes of ev(1) went: the rest of ev(1) is pinned, ev(2) is its own frame.
    assert t.offered == [ev(0) + ev(1) + ev(2)]
    assert (w.queue_depth, w.queued_bytes, w.bytes_sent) == (2, 18, 15)
    assert w.pinned and not w.coalescing
    w.deliver(framed(ev(3)))  # the I/O task has the queue: queued behind it, no window
    assert not w.coalescing and coalescer.waiting == 0
    await turns()
    t.writable()
    await asyncio.wait_for(w.flush(), 1)
    assert bytes(t.wire) == b"".join(ev(i) for i in range(4))
    assert not w.pending
    # Idle again: the next event waits for a window.
    w.deliver(framed(ev(4)))
    assert w.coalescing


async def test_a_refused_batch_keeps_its_frames_droppable_over_tcp() -> None:
    w, t, _, coalescer = coalescing(
        ScriptedTransport(0, then=BLOCK),
        max_queue_messages=3,
        overflow_policy=OverflowPolicy.DROP_OLDEST,
    )
    for i in range(3):
        w.deliver(framed(ev(i)))
    coalescer.end_window()
    assert (w.queue_depth, w.pinned) == (3, False)
    assert w.deliver(framed(ev(3)))  # drops ev(0): nothing of it was sent
    assert w.dropped == 1
    await turns()
    t.writable(ALL)
    await asyncio.wait_for(w.flush(), 1)
    assert bytes(t.wire) == ev(1) + ev(2) + ev(3)


async def test_over_tls_a_refused_batch_is_offered_again_whole_first() -> None:
    w, t, _, coalescer = coalescing(ScriptedTransport(0, BLOCK, sticky=True))
    for i in range(3):
        w.deliver(framed(ev(i)))
    coalescer.end_window()
    batch = ev(0) + ev(1) + ev(2)
    assert (w.queue_depth, w.queued_bytes, w.pinned) == (1, 33, True)
    w.deliver(framed(ev(3)))
    await turns()
    t.writable()
    await asyncio.wait_for(w.flush(), 1)
    assert t.offered[:2] == [batch, batch + ev(3)]
    assert bytes(t.wire) == batch + ev(3)


async def test_flush_writes_a_coalescing_queue_at_once() -> None:
    w, t, _, coalescer = coalescing()
    w.deliver(framed(ev(0)))
    w.deliver(framed(ev(1)))
    await asyncio.wait_for(w.flush(), 1)
    assert t.offered == [ev(0) + ev(1)]
    assert not w.pending
    coalescer.end_window()  # the stream has nothing left for it
    assert t.offered == [ev(0) + ev(1)]


@pytest.mark.parametrize("last", [b"", BYE], ids=["no farewell", "farewell"])
async def test_stop_writes_the_coalesced_frames_and_the_farewell_in_one_send(last: bytes) -> None:
    w, t, closed, coalescer = coalescing(chunked=True)
    w.deliver(framed(ev(0)))
    w.send(ev(1))
    w.stop(CloseReason.SHUTDOWN, last)
    batch = chunk(ev(0)) + chunk(ev(1)) + (chunk(last) if last else b"")
    assert t.offered == [batch, LAST_CHUNK]
    assert closed == [CloseReason.SHUTDOWN]
    assert w.events_sent == 2
    coalescer.end_window()  # nothing touches the closed transport (autouse fixture)


async def test_a_drain_the_socket_takes_in_part_ends_after_the_rest() -> None:
    w, t, closed, _ = coalescing(ScriptedTransport(5, BLOCK))
    w.deliver(framed(ev(0)))
    w.stop(CloseReason.STOPPED, BYE)
    assert w.state is State.DRAINING and w.pending
    await turns()
    t.writable()
    assert await asyncio.wait_for(w.wait_closed(), 1) is CloseReason.STOPPED
    assert bytes(t.wire) == ev(0) + BYE
    assert closed == [CloseReason.STOPPED]


@pytest.mark.parametrize("how", ["peer closes", "close()", "write error"])
async def test_a_stream_closed_while_coalescing_is_not_written(how: str) -> None:
    fails: tuple[Step, ...] = (BrokenPipeError(errno.EPIPE, "broken pipe"),)
    script = fails if how == "write error" else ()
    w, t, closed, coalescer = coalescing(ScriptedTransport(*script))
    w.deliver(framed(ev(0)))
    w.deliver(framed(ev(1)))
    if how == "peer closes":
        t.peer_closes()
    elif how == "close()":
        w.close(CloseReason.STOPPED)
    coalescer.end_window()  # no error, and no send on a closed transport
    expected = {
        "peer closes": CloseReason.CLIENT_CLOSED,
        "close()": CloseReason.STOPPED,
        "write error": CloseReason.WRITE_ERROR,
    }[how]
    assert closed == [expected]
    assert t.offered == ([ev(0) + ev(1)] if how == "write error" else [])
    assert not w.coalescing and not w.pending and t.closes == 1
    assert not w.deliver(framed(ev(2)))
    assert coalescer.waiting == 0 and not coalescer.armed


async def test_no_keepalive_while_coalesced_frames_wait() -> None:
    w, t, _, coalescer = coalescing()
    w.deliver(framed(ev(0)))
    w.keepalive(KEEPALIVE, 1)
    coalescer.end_window()
    assert t.offered == [ev(0)]
    assert w.quiet == 0


async def test_the_held_head_and_welcome_are_not_coalesced() -> None:
    w, t, _, coalescer = coalescing(live=False)
    w.hold(HEAD)
    w.send(ev(0))
    assert not w.coalescing and not coalescer.armed
    w.release()
    assert t.offered == [HEAD + ev(0)]
    w.send(ev(1))  # LIVE now
    assert w.coalescing


@pytest.mark.parametrize(
    ("policy", "wire", "dropped"),
    [
        (OverflowPolicy.DROP_NEWEST, [0, 1, 2], 2),
        (OverflowPolicy.DROP_OLDEST, [2, 3, 4], 2),
    ],
)
async def test_the_queue_bounds_apply_while_coalescing(
    policy: OverflowPolicy, wire: list[int], dropped: int
) -> None:
    w, t, closed, coalescer = coalescing(max_queue_messages=3, overflow_policy=policy)
    for i in range(5):
        w.deliver(framed(ev(i)))
    assert (w.queue_depth, w.dropped, w.events_sent) == (3, dropped, 3)
    coalescer.end_window()
    assert bytes(t.wire) == b"".join(ev(i) for i in wire)
    assert closed == []


async def test_overflow_disconnect_while_coalescing() -> None:
    w, t, closed, coalescer = coalescing(max_queue_bytes=30)
    assert w.deliver(framed(ev(0))) and w.deliver(framed(ev(1)))
    assert not w.deliver(framed(ev(2)))  # 33 bytes > 30
    assert closed == [CloseReason.OVERFLOW]
    assert (w.dropped, w.events_sent) == (3, 0)
    coalescer.end_window()
    assert t.offered == []


async def test_the_first_frame_of_a_window_is_taken_whatever_its_size() -> None:
    # As on the fast path: the bounds are on what waits behind another frame.
    w, t, closed, coalescer = coalescing(max_queue_bytes=5)
    assert w.deliver(framed(ev(0)))
    coalescer.end_window()
    assert t.offered == [ev(0)] and closed == []


async def test_a_paced_replay_is_coalesced_and_never_waits_for_the_window() -> None:
    w, t, _, coalescer = coalescing(max_queue_messages=4)
    replay = [ev(i) for i in range(10)]
    for frame in replay:
        await asyncio.wait_for(w.send_paced(frame), 1)
    # Each flush of the pacing wrote the queue at once, 3 frames to a send;
    # the tail waits for the window like any event.
    assert t.offered == [ev(0) + ev(1) + ev(2), ev(3) + ev(4) + ev(5), ev(6) + ev(7) + ev(8)]
    assert w.coalescing
    coalescer.end_window()
    assert bytes(t.wire) == b"".join(replay)
    assert w.events_sent == 10


async def test_a_failing_stream_does_not_stop_the_window(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def __init__(self) -> None:
            self.closed: list[CloseReason] = []

        def write_coalesced(self) -> None:
            raise RuntimeError("bug")

        def close(self, reason: CloseReason) -> None:
            self.closed.append(reason)

    coalescer = Coalescer(60.0)
    broken = Broken()
    coalescer.add(broken)
    w, t, _, _ = coalescing(coalescer=coalescer)
    w.deliver(framed(ev(0)))
    coalescer.end_window()
    assert broken.closed == [CloseReason.HOOK_ERROR]
    assert "Uncaught exception writing a coalesced batch" in caplog.text
    assert t.offered == [ev(0)]


async def test_a_queue_the_io_task_takes_is_no_longer_coalescing() -> None:
    # The I/O task is woken for a refused batch that drop_oldest then empties;
    # a new window opens before the task runs, and the task takes that queue.
    w, t, _, coalescer = coalescing(
        ScriptedTransport(0, BLOCK),
        max_queue_bytes=33,
        overflow_policy=OverflowPolicy.DROP_OLDEST,
    )
    w.deliver(framed(ev(0)))
    coalescer.end_window()  # refused: ev(0) waits for the I/O task
    assert not w.deliver(framed(b"x" * 34))  # drops ev(0), and is dropped
    assert w.queue_depth == 0
    w.deliver(framed(ev(1)))  # opens a window
    await turns()  # the I/O task takes ev(1): the socket blocks, it is in flight
    assert t.offered == [ev(0), ev(1)] and w.pending and not w.coalescing
    w.deliver(framed(ev(2)))  # behind the batch in flight, for the I/O task
    coalescer.end_window()
    assert t.offered == [ev(0), ev(1)]  # nothing overtook ev(1)
    t.writable()
    await asyncio.wait_for(w.flush(), 1)
    assert bytes(t.wire) == ev(1) + ev(2)


# --- memory of an idle stream ---------------------------------------------------------


def test_a_writer_with_nothing_queued_holds_no_queue_of_its_own() -> None:
    """An empty deque holds a 64-slot block (about 600 bytes) and ``clear()``
    allocates a fresh one: a writer that queued its head and welcome and
    wrote them must not keep that block for the life of an idle stream."""
    import tracemalloc

    transports = [ScriptedTransport() for _ in range(500)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = []
        for t in transports:
            w, _, _ = writer(t, live=False)
            w.hold(HEAD)
            w.send(ev(0))  # the welcome, held behind the head
            w.release()  # both written in one send
            assert not w.pending
            kept.append(w)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_writer = sum(s.size_diff for s in after.compare_to(before, "filename")) / len(kept)
    # The writer, its limits and the helper's list: about 840 bytes; with a
    # deque block of its own, over 2,000.
    assert per_writer < 1200, per_writer
    assert all(t.wire == HEAD + ev(0) for t in transports)


async def test_a_queue_emptied_by_the_io_task_is_given_back_and_taken_again() -> None:
    w, t, _ = await in_flight(ev(0))
    assert w.send(ev(1))  # queued behind the batch in flight
    t.writable()  # the batch, then the queue, go out
    await turns()
    assert not w.pending
    t.script.extend([BLOCK])
    assert w.send(ev(2))  # would block: queued again, on a queue of its own
    assert w.queue_depth == 1
    await turns()  # the I/O task takes it; the socket takes it now
    assert t.wire == ev(0) + ev(1) + ev(2)
    assert not w.pending


# --- several frames in one write (a replay) --------------------------------------------


def test_send_many_writes_what_waits_for_nothing_in_one_send() -> None:
    w, t, _ = writer(chunked=True)
    w.send_many([ev(0), ev(1), ev(2)])
    assert t.offered == [chunk(ev(0)) + chunk(ev(1)) + chunk(ev(2))]
    assert (w.events_sent, w.pending) == (3, False)


async def test_send_many_queues_what_the_socket_did_not_take_frame_by_frame() -> None:
    w, t, _ = writer(ScriptedTransport(16))  # takes ev(0) and 5 bytes of ev(1)
    w.send_many([ev(0), ev(1), ev(2)])
    assert w.queue_depth == 2 and w.pinned  # the rest of ev(1), then ev(2)
    assert w.queued_bytes == 33 - 16
    assert w.events_sent == 3
    await turns()
    assert t.wire == ev(0) + ev(1) + ev(2)
    assert not w.pending


async def test_send_many_behind_waiting_frames_queues_each_in_order() -> None:
    w, t, _ = await in_flight(ev(0))
    w.send_many([ev(1), ev(2)])
    assert w.queue_depth == 2
    t.writable()
    await turns()
    assert t.wire == ev(0) + ev(1) + ev(2)


def test_send_many_refuses_an_oversized_frame_before_writing_any() -> None:
    w, t, _ = writer(max_event_size=11)
    with pytest.raises(ValueError, match="max_event_size"):
        w.send_many([ev(0), b"x" * 12])
    assert t.offered == []
    assert w.events_sent == 0


async def test_send_paced_writes_batches_of_a_quarter_of_the_bounds() -> None:
    w, t, _ = writer(max_queue_messages=8)
    await w.send_paced(*(ev(i) for i in range(5)))
    assert t.offered == [ev(0) + ev(1), ev(2) + ev(3), ev(4)]
    assert w.events_sent == 5


async def test_a_held_burst_the_socket_cannot_take_is_not_joined_again_per_frame() -> None:
    """Past HOLD_LIMIT a held stream writes what it holds; when the socket
    takes only part, the rest waits for the I/O task. Writing the whole
    growing queue again for every later frame copied it once per frame
    (a 3,000-event replay sent without waiting blocked the loop for 1.4 s)."""
    w, t, _ = writer(ScriptedTransport(16, then=BLOCK), live=False)
    w.hold(HEAD)
    frame = b"data: " + b"x" * 1000 + b"\n\n"
    for _ in range(200):  # about 200 KB, three times the hold limit
        w.send(frame)
    assert len(t.offered) == 1  # one write at the limit; the rest queued behind it
    assert w.queue_depth > 100
