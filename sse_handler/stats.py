"""Counters of one endpoint, kept as plain integers.

Nothing here runs per event: live connections keep their own counts
(``events_sent``, ``bytes_sent``, ``dropped``), and the endpoint adds a
connection's counts to its totals once, when it closes. A snapshot sums the
totals and the live connections, so reading the numbers costs the reader, not
the write path. :mod:`sse_handler.metrics` exposes them to Prometheus.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["ConnectionCounts", "EndpointStats", "Snapshot"]


class ConnectionCounts(Protocol):
    @property
    def events_sent(self) -> int: ...

    @property
    def bytes_sent(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    open: int
    opened: int
    closed: dict[str, int]
    events_sent: int
    bytes_sent: int
    dropped: int
    replays: int
    resets: dict[str, int]
    queue_depths: list[int]


@dataclass(slots=True)
class EndpointStats:
    opened: int = 0
    closed: Counter[str] = field(default_factory=Counter)
    replays: int = 0
    resets: Counter[str] = field(default_factory=Counter)
    # What connections that have closed sent and dropped.
    events_sent: int = 0
    bytes_sent: int = 0
    dropped: int = 0

    def connection_closed(self, conn: ConnectionCounts, reason: str) -> None:
        """Add a closed connection's counts to the totals."""
        self.closed[reason] += 1
        self.events_sent += conn.events_sent
        self.bytes_sent += conn.bytes_sent
        self.dropped += conn.dropped

    def snapshot(self, live: Iterable[ConnectionCounts]) -> Snapshot:
        """The totals plus what the ``live`` connections have counted so far."""
        conns = list(live)
        return Snapshot(
            open=len(conns),
            opened=self.opened,
            closed=dict(self.closed),
            events_sent=self.events_sent + sum(c.events_sent for c in conns),
            bytes_sent=self.bytes_sent + sum(c.bytes_sent for c in conns),
            dropped=self.dropped + sum(c.dropped for c in conns),
            replays=self.replays,
            resets=dict(self.resets),
            queue_depths=[c.queue_depth for c in conns],
        )
