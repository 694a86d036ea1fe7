"""Deadlines of many things: one heap and one loop timer, not one timer each.

A connection whose credential expires (``conn.auth_expires_at``) is stopped
when it does, to the tenth of a second; the keep-alive tick is far coarser
(half the keep-alive interval). Entries name a key (a cid), not the
connection: a connection that ends early is skipped when its time comes, and
the heap is rebuilt from the live keys when stale entries outnumber them.
The Redis broker times its SUBSCRIBE confirmations the same way
(``asyncio.wait_for`` costs about 20 µs per wait).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Collection, Hashable
from typing import Any

__all__ = ["Deadlines"]


class Deadlines:
    """Calls ``due(key)`` once for each key added, at (or just after) its time.

    Times are ``loop.time()`` values. ``live()`` gives the keys still worth
    keeping when the heap is compacted.
    """

    def __init__(
        self, due: Callable[[Any], None], live: Callable[[], Collection[Hashable]]
    ) -> None:
        self._due = due
        self._live = live
        self._heap: list[tuple[float, int, Hashable]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, key: Hashable) -> None:
        heapq.heappush(self._heap, (when, next(self._order), key))
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._live()):
            live = set(self._live())
            self._heap = [entry for entry in self._heap if entry[2] in live]
            heapq.heapify(self._heap)
        self._arm()

    def cancel(self) -> None:
        """Forget every deadline (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def _arm(self) -> None:
        if not self._heap:
            return
        when = self._heap[0][0]
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        while self._heap and self._heap[0][0] <= now:
            _, _, key = heapq.heappop(self._heap)
            self._due(key)
        self._arm()
