"""Telling a connection that died without a word from one that is only quiet.

The Redis reader reads its Pub/Sub connection without a timeout per read:
with redis-py, a timeout per read is about half the CPU of reading a message
(5.0 against 9.2 µs of CPU per message with hiredis, python -m
bench.redis_parser; docs/benchmarks.md, notes). A connection
that dies without a FIN or RST (a partition, a host gone) then never fails by
itself. :class:`SilenceWatch` is the one timer that notices: after ``quiet``
seconds without a message it asks for a probe (a ``PING``, whose answer is a
message); when ``grace`` seconds more pass without one, it cancels the read,
and :meth:`SilenceWatch.cut` turns that cancellation into the failure the
reader reports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["SilenceWatch"]


class SilenceWatch:
    """One reading task's watch; its loop sets :attr:`listening` around each
    read and :attr:`heard_at` (``time.monotonic()``) after each message::

        watch.start()
        while ...:
            watch.listening = True
            try:
                message = await read()
            except asyncio.CancelledError:
                if watch.cut():
                    raise TimeoutError("no answer to the probe")
                raise
            finally:
                watch.listening = False
            watch.heard_at = time.monotonic()
    """

    def __init__(self, quiet: float, grace: float, probe: Callable[[], object]) -> None:
        self.quiet = quiet
        self.grace = grace
        self._probe = probe
        #: When the last message came (``time.monotonic()``).
        self.heard_at = 0.0
        #: The task is waiting in its read now (only then is it cancelled).
        self.listening = False
        self._probed_at: float | None = None
        self._cutting = False
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Watch the task running now, from now on (a new connection)."""
        self.stop()
        self._task = asyncio.current_task()
        self.heard_at = time.monotonic()
        self._probed_at = None
        self._arm(self.quiet)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._task = None
        self._cutting = False

    def cut(self) -> bool:
        """In the task's ``except CancelledError``: did the watch cancel the
        read, and nothing else (a close) cancel the task too?"""
        if not self._cutting or self._task is None:
            return False
        self._cutting = False
        return self._task.uncancel() == 0

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        task = self._task
        if task is None or task.done():
            return
        now = time.monotonic()
        if not self.listening:
            # Busy with a message (a catch-up reads with timeouts of its
            # own): not silence.
            self.heard_at = now
            self._probed_at = None
            self._arm(self.quiet)
        elif self._probed_at is not None and self.heard_at < self._probed_at:
            left = self._probed_at + self.grace - now
            if left > 0:
                self._arm(left)  # probed, no answer yet: wait out the grace
                return
            self._cutting = True  # probed ``grace`` ago, and nothing came
            task.cancel()
        elif now - self.heard_at < self.quiet:
            self._probed_at = None
            self._arm(self.quiet - (now - self.heard_at))
        else:
            self._probed_at = now
            self._probe()
            # Look again after the shorter of the two. If the answer has
            # come by then, the branch above waits until ``quiet`` after it
            # for the next probe; if not, the branch before waits out the
            # rest of ``grace`` and then cuts.
            self._arm(min(self.grace, self.quiet))
