"""The embedded broker: one process, channels, bounded history for replay.

Ids are ``<epoch>-<seq>``: ``seq`` is one counter for all channels of this
broker (so ids are monotonic per channel, and one cursor orders events across
the channels a client reads), and ``epoch`` is drawn when the broker starts, so
an id from before a restart is recognised as unknown instead of being taken for
a position in the new history.

What is kept, and for how long:

* per channel, the newest ``history_size`` events, none older than
  ``history_age`` seconds (0 = no age bound);
* at most ``max_channels`` channels with history: publishing to one more
  forgets the channel published least recently;
* with ``history_age``, a channel whose whole history has expired and that no
  local connection reads is forgotten, a few such channels per publish.

Forgetting a channel keeps one number: the position of its newest event,
folded into one of ``_FORGOTTEN_BUCKETS`` watermarks by the hash of its
name. A client resuming on a forgotten channel (or on a new one in the same
bucket) from before that watermark gets ``history_exceeded``: it may have
missed events, and is told so instead of getting a silent gap.

Lookups cost O(log n) per channel the client reads: a broker id is parsed
strictly (only the form this broker writes; ``int()`` would also take signs,
underscores, whitespace and non-ASCII digits), then the history is bisected on
its position; an id the publisher chose is found in a per-channel index.
"""

from __future__ import annotations

import heapq
import re
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from operator import attrgetter

from ..event import ServerSentEvent
from . import Delivery, Listener, Replay, body_frame

__all__ = ["MemoryBroker"]

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"

#: A sequence number as this broker writes it: lowercase ASCII base 36, no
#: leading zero, at most 13 digits (36**13 > 2**64: more events than any
#: process will publish). ``\Z``, not ``$``, which would allow a newline.
_SEQ = re.compile(r"[1-9a-z][0-9a-z]{0,12}\Z")

#: Watermarks of forgotten channels (a power of two: a mask picks one).
_FORGOTTEN_BUCKETS = 1024

#: Channels the age sweep looks at per publish, at most: more than a publish
#: can create (one), so a backlog drains, and few enough that no publish
#: stalls the loop.
_SWEEP_BATCH = 16

_position = attrgetter("position")

#: What a trimmed slot of a history holds until the list is compacted.
_TRIMMED = Delivery("", "", 0, b"")


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _BASE36[r] + out
        if not n:
            return out


@dataclass(slots=True, eq=False)
class _Channel:
    """One channel's history: ``deliveries[start:]``, oldest first, with the
    monotonic time of each publish in ``times`` (same indexes).

    Trimming advances ``start``; the lists are compacted once the trimmed
    head is at least half of them, so trimming is amortised O(1) and the
    history stays a list that can be bisected.
    """

    #: Position of the newest event trimmed from the history (0: none yet),
    #: or the watermark of its bucket when the channel was forgotten before.
    trimmed: int
    #: When the channel was last published to (or, for one a local
    #: connection reads, last looked at by the age sweep).
    touched: float
    deliveries: list[Delivery] = field(default_factory=list)
    times: array[float] = field(default_factory=lambda: array("d"))
    start: int = 0
    #: Ids the publisher chose, still in the history, to their newest position.
    caller_ids: dict[str, int] | None = None

    def last_position(self) -> int:
        """The position of the channel's newest event, kept or trimmed."""
        if self.start < len(self.deliveries):
            return int(self.deliveries[-1].position)
        return self.trimmed


class MemoryBroker:
    """Channels and history in this process's memory.

    ``history_size`` events and ``history_age`` seconds (0 = no age bound) are
    kept per channel for Last-Event-ID replay, in at most ``max_channels``
    channels (the least recently published is forgotten first). With
    ``history_age``, a channel that no local connection reads is forgotten
    once its whole history has expired. A client resuming on a forgotten
    channel gets ``reset`` (``history_exceeded``).
    """

    _instances = 0
    #: Its coroutines never wait on anything, so a stream's registration
    #: needs no task for them (:func:`sse_handler.tasks.start_soon`). Read
    #: off this class only: a subclass that waits gets a task.
    needs_no_task = True

    def __init__(
        self, history_size: int = 1000, history_age: float = 0.0, max_channels: int = 10_000
    ) -> None:
        if max_channels < 1:
            raise ValueError("max_channels must be at least 1")
        self.history_size = history_size
        self.history_age = history_age
        self.max_channels = max_channels
        # Milliseconds since 2020 in base 36 (8 characters until 2109), plus
        # a count of the brokers made in this process: distinct across
        # restarts and across brokers of one process.
        MemoryBroker._instances += 1
        ms = int(time.time() * 1000) - 1_577_836_800_000
        self.epoch = _base36(ms) + _base36(MemoryBroker._instances)
        self._seq = 0
        # Least recently published first: what max_channels and the age
        # sweep forget comes off the front.
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        self._forgotten = [0] * _FORGOTTEN_BUCKETS
        self._subscribed: set[str] = set()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def publish(self, channel: str, event: ServerSentEvent) -> str:
        self._seq += 1
        seq = self._seq
        caller_id = event.id is not None
        event_id = event.id if event.id is not None else f"{self.epoch}-{_base36(seq)}"
        frame = body_frame(event_id, event.encode(), caller_id)
        delivery = Delivery(channel, event_id, seq, frame)
        now = time.monotonic()
        channels = self._channels
        state = channels.get(channel)
        if state is None:
            state = channels[channel] = _Channel(self._forgotten_upto(channel), now)
        else:
            channels.move_to_end(channel)
            state.touched = now
        state.deliveries.append(delivery)
        state.times.append(now)
        if caller_id:
            if state.caller_ids is None:
                state.caller_ids = {}
            state.caller_ids[event_id] = seq
        self._trim(state, now)
        self._sweep(now)
        if channel in self._subscribed:
            for listener in self._listeners:
                listener(delivery)
        return event_id

    def _trim(self, state: _Channel, now: float) -> None:
        deliveries, times, start = state.deliveries, state.times, state.start
        end = max(start, len(deliveries) - self.history_size)
        if self.history_age:
            # Publish times are monotonic: the expired events are a prefix.
            end = bisect_left(times, now - self.history_age, end)
        if end == start:
            return
        gone = deliveries[start:end]
        state.trimmed = gone[-1].position
        caller_ids = state.caller_ids
        if caller_ids:
            for delivery in gone:
                if caller_ids.get(delivery.id) == delivery.position:
                    del caller_ids[delivery.id]
        # The frames go now; the slots go when the list is compacted.
        deliveries[start:end] = [_TRIMMED] * len(gone)
        if end >= 32 and 2 * end >= len(deliveries):
            del deliveries[:end]
            del times[:end]
            end = 0
        state.start = end

    def _sweep(self, now: float) -> None:
        """Forget channels: over ``max_channels``, and (a batch at a time) those
        whose whole history expired, unless a local connection reads them."""
        channels = self._channels
        while len(channels) > self.max_channels:
            self._forget(*channels.popitem(last=False))
        if not self.history_age:
            return
        horizon = now - self.history_age
        for _ in range(_SWEEP_BATCH):
            if not channels:
                return
            name = next(iter(channels))
            state = channels[name]
            if state.touched >= horizon:
                return  # the front is the least recently touched: none else expired
            if name in self._subscribed:
                # Kept while read (its trim mark stays exact); looked at again
                # one history_age from now.
                self._trim(state, now)
                channels.move_to_end(name)
                state.touched = now
            else:
                del channels[name]
                self._forget(name, state)

    def _forget(self, channel: str, state: _Channel) -> None:
        bucket = hash(channel) & (_FORGOTTEN_BUCKETS - 1)
        self._forgotten[bucket] = max(self._forgotten[bucket], state.last_position())

    def _forgotten_upto(self, channel: str) -> int:
        """The newest position this channel may have had before it was forgotten."""
        return self._forgotten[hash(channel) & (_FORGOTTEN_BUCKETS - 1)]

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def position(self, event_id: str) -> int | None:
        """The sequence number of an id this broker assigned, else ``None``.

        Only the exact form the broker writes is taken: ``int()`` would also
        accept signs, underscores, whitespace, upper case, leading zeros and
        non-ASCII digits, and so read a hostile id as some other event's.
        """
        epoch, dash, seq = event_id.rpartition("-")
        if not dash or epoch != self.epoch or not _SEQ.match(seq):
            return None
        position = int(seq, 36)
        return position if position <= self._seq else None

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        cursor = self.position(last_event_id)
        if cursor is None:
            cursor = self._caller_id_position(channels, last_event_id)
        if cursor is None:
            return Replay(reset="unknown_id")
        now = time.monotonic()
        runs: list[list[Delivery]] = []
        for channel in channels:
            state = self._channels.get(channel)
            if state is None:
                if self._forgotten_upto(channel) > cursor:
                    return Replay(reset="history_exceeded")
                continue
            self._trim(state, now)
            if state.trimmed > cursor:
                return Replay(reset="history_exceeded")
            deliveries = state.deliveries
            first = bisect_right(deliveries, cursor, state.start, key=_position)
            if first < len(deliveries):
                runs.append(deliveries[first:])
        if len(runs) > 1:
            return Replay(list(heapq.merge(*runs, key=_position)), after=cursor)
        return Replay(runs[0] if runs else [], after=cursor)

    def _caller_id_position(self, channels: Collection[str], event_id: str) -> int | None:
        """Where an id that the publisher chose (not ours) sits, if still in history."""
        found: int | None = None
        for channel in channels:
            state = self._channels.get(channel)
            if state is not None and state.caller_ids:
                position = state.caller_ids.get(event_id)
                if position is not None and (found is None or position > found):
                    found = position
        return found

    async def close(self) -> None:
        self._listeners.clear()
        self._subscribed.clear()
