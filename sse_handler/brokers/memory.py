"""The embedded broker: one process, channels, bounded history for replay.

Ids are ``<epoch>-<seq>``: ``seq`` is one counter for all channels of this
broker (so ids are monotonic per channel, and one cursor orders events across
the channels a client reads), and ``epoch`` is drawn when the broker starts, so
an id from before a restart is recognised as unknown instead of being taken for
a position in the new history.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from ..event import ServerSentEvent
from . import Delivery, Listener, Replay, body_frame

__all__ = ["MemoryBroker"]

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _BASE36[r] + out
        if not n:
            return out


@dataclass(slots=True)
class _Channel:
    history: deque[tuple[float, Delivery]]
    #: Position of the newest event trimmed from the history (0: none yet).
    trimmed: int = 0


class MemoryBroker:
    """Channels and history in this process's memory.

    ``history_size`` events and ``history_age`` seconds (0 = no age bound) are
    kept per channel for Last-Event-ID replay.
    """

    _instances = 0

    def __init__(self, history_size: int = 1000, history_age: float = 0.0) -> None:
        self.history_size = history_size
        self.history_age = history_age
        # Milliseconds since 2020 in base 36 (8 characters until 2109), plus
        # a count of the brokers made in this process: distinct across
        # restarts and across brokers of one process.
        MemoryBroker._instances += 1
        ms = int(time.time() * 1000) - 1_577_836_800_000
        self.epoch = _base36(ms) + _base36(MemoryBroker._instances)
        self._seq = 0
        self._channels: dict[str, _Channel] = {}
        self._subscribed: set[str] = set()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def publish(self, channel: str, event: ServerSentEvent) -> str:
        self._seq += 1
        seq = self._seq
        event_id = event.id if event.id is not None else f"{self.epoch}-{_base36(seq)}"
        delivery = Delivery(
            channel, event_id, seq, body_frame(event_id, event.encode(), event.id is not None)
        )
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(deque())
        now = time.monotonic()
        state.history.append((now, delivery))
        self._trim(state, now)
        if channel in self._subscribed:
            for listener in self._listeners:
                listener(delivery)
        return event_id

    def _trim(self, state: _Channel, now: float) -> None:
        history = state.history
        while len(history) > self.history_size or (
            self.history_age and history and history[0][0] < now - self.history_age
        ):
            state.trimmed = history.popleft()[1].position

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def position(self, event_id: str) -> int | None:
        epoch, _, seq = event_id.rpartition("-")
        if epoch != self.epoch:
            return None
        try:
            return int(seq, 36)
        except ValueError:
            return None

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        cursor = self.position(last_event_id)
        if cursor is None:
            cursor = self._caller_id_position(channels, last_event_id)
        if cursor is None or cursor > self._seq:
            return Replay(reset="unknown_id")
        now = time.monotonic()
        found: list[Delivery] = []
        for channel in channels:
            state = self._channels.get(channel)
            if state is None:
                continue
            self._trim(state, now)
            if state.trimmed > cursor:
                return Replay(reset="history_exceeded")
            found.extend(d for _, d in state.history if d.position > cursor)
        found.sort(key=lambda d: d.position)
        return Replay(found)

    def _caller_id_position(self, channels: Collection[str], event_id: str) -> int | None:
        """Where an id that the publisher chose (not ours) sits, if still in history."""
        for channel in channels:
            state = self._channels.get(channel)
            if state is not None:
                for _, delivery in reversed(state.history):
                    if delivery.id == event_id:
                        return int(delivery.position)
        return None

    async def close(self) -> None:
        self._listeners.clear()
        self._subscribed.clear()
