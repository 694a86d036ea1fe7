"""Stream deadlines: one heap and one loop timer per handler, not one per connection.

A connection whose credential expires (``conn.auth_expires_at``) is stopped
when it does, to the tenth of a second; the keep-alive tick is far coarser
(half the keep-alive interval). Entries name a cid, not the connection: a
connection that ends early is skipped when its time comes, and the heap is
rebuilt from the live ones when stale entries outnumber them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Collection

__all__ = ["Deadlines"]


class Deadlines:
    """Calls ``due(cid)`` once for each cid added, at (or just after) its time.

    Times are ``loop.time()`` values. ``live()`` gives the cids still worth
    keeping when the heap is compacted.
    """

    def __init__(self, due: Callable[[str], None], live: Callable[[], Collection[str]]) -> None:
        self._due = due
        self._live = live
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, cid: str) -> None:
        heapq.heappush(self._heap, (when, next(self._order), cid))
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
            _, _, cid = heapq.heappop(self._heap)
            self._due(cid)
        self._arm()
