"""The coalescing window: one loop timer per handler, not one per connection.

With a handler's ``coalesce_window`` above 0, an event for a live stream is
not written at once: it waits in the stream's queue, and the stream waits here
(:meth:`Coalescer.add`, once per window). ``window`` seconds after the first
stream of a window arrived, the timer ends the window and every waiting stream
writes its queued frames in one ``send`` (issue 15: the kernel's ``send``
dominates the CPU of a delivery, so a connection that gets several events
within the window costs one ``send`` for all of them).

A stream that joins just before the window ends waits less than ``window``:
the timer is the handler's, not the stream's, so the added latency is at most
``window``, never more. Streams are written in the order they joined.

asyncio only; the streams are seen through :class:`Coalesced`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .lifecycle import CloseReason
from .tasks import log

__all__ = ["Coalesced", "Coalescer"]


class Coalesced(Protocol):
    """A stream whose queued frames wait for the end of a window."""

    def write_coalesced(self) -> None:
        """Write what waits for the window, in one ``send`` (a no-op if nothing does)."""

    def close(self, reason: CloseReason) -> None: ...


class Coalescer:
    """The coalescing window of one handler (see the module docstring)."""

    __slots__ = ("_timer", "_waiting", "window")

    def __init__(self, window: float) -> None:
        #: Seconds from the first stream of a window to its end.
        self.window = window
        self._waiting: list[Coalesced] = []
        self._timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        """How many streams wait for the end of the current window."""
        return len(self._waiting)

    @property
    def armed(self) -> bool:
        """True while a window is open (its timer pending)."""
        return self._timer is not None

    def add(self, stream: Coalesced) -> None:
        """``stream`` has frames waiting: write them when the window ends.

        A stream is added once per window (by the writer, when its first frame
        of the window is queued); the first one opens the window.
        """
        self._waiting.append(stream)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.window, self.end_window)

    def end_window(self) -> None:
        """End the window now: every waiting stream writes its frames.

        The timer's callback; shutdown calls it too, so nothing waits on a
        timer that will never run. A stream that flushed, stopped or closed
        meanwhile has nothing left to write and is skipped by its writer.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        for stream in waiting:
            try:
                stream.write_coalesced()
            except Exception:
                # As in a stream's I/O task: a bug closes that stream, and
                # the other streams of the window are still written.
                log.exception("Uncaught exception writing a coalesced batch of %r", stream)
                stream.close(CloseReason.HOOK_ERROR)
